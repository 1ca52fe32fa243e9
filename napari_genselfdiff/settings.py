"""What the widgets remember between sessions: last model, device, folders, presets.

A small JSON file in the user config directory (``platformdirs``, a napari dependency);
``GENSELFDIFF_NAPARI_CONFIG_DIR`` points it elsewhere (the tests use a temporary folder,
so they never touch the real file). ``changed`` tells open widgets about a new value, so
a model saved by the Fine-tune widget becomes the Segment widget's model at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from psygnal import Signal

from genselfdiff.io.atomic import write_text

ENV_DIR = "GENSELFDIFF_NAPARI_CONFIG_DIR"


def settings_file() -> Path:
    folder = os.environ.get(ENV_DIR)
    if not folder:
        from platformdirs import user_config_dir

        folder = user_config_dir("napari-genselfdiff", appauthor=False)
    return Path(folder) / "settings.json"


class Settings:
    """A persisted key -> JSON value mapping; every ``set`` is written through at once."""

    changed = Signal(str, object)

    def get(self, key: str, default=None):
        return self._read().get(key, default)

    def set(self, key: str, value) -> None:
        data = self._read()
        if data.get(key) == value:
            return
        data[key] = value
        path = settings_file()
        try:
            write_text(path, json.dumps(data, indent=1))
        except OSError:  # a read-only home must not break the widgets
            pass
        self.changed.emit(key, value)

    def _read(self) -> dict:
        try:
            data = json.loads(settings_file().read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


settings = Settings()
