"""The napari widgets in a real viewer (Xvfb + Mesa; pytest-xvfb starts the display)."""

import os

import numpy as np
import pytest
from npe2 import PluginManifest

pytestmark = pytest.mark.gui

PLUGIN = "napari-genselfdiff"
WIDGETS = [w.display_name for w in PluginManifest.from_distribution(PLUGIN).contributions.widgets]


@pytest.fixture(autouse=True)
def _private_settings(tmp_path, monkeypatch):
    """Never read or write the user's real settings file."""
    monkeypatch.setenv("GENSELFDIFF_NAPARI_CONFIG_DIR", str(tmp_path / "config"))


def test_display_is_real_not_offscreen():
    # Qt's offscreen platform has no OpenGL: napari's canvas would fail, or test nothing.
    assert os.environ.get("QT_QPA_PLATFORM") != "offscreen"


def test_manifest_declares_the_three_widgets():
    assert set(WIDGETS) >= {"Pretrain", "Fine-tune", "Segment"}


@pytest.mark.parametrize("name", WIDGETS)
def test_widget_docks(make_napari_viewer, name):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert dock.isAncestorOf(widget)
    assert name in dock.name
