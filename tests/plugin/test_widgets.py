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


def test_finetune_widget_leaves_the_budget_to_the_engine_and_says_what_it_is(make_napari_viewer):
    from genselfdiff.train.finetune import SPARSE_CONTINUE_STEPS, SPARSE_STEPS
    from napari_genselfdiff._jobs import _budget

    _, widget = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert _budget(widget.budget.spec()) == {}  # the engine's: it knows a first run from a correction round
    assert widget.budget.amount.text() == f"default (strokes {SPARSE_STEPS} steps, Continue {SPARSE_CONTINUE_STEPS})"


def test_viewer_opens_a_slide_as_a_multiscale_image_with_its_scale(make_napari_viewer, synthetic_slide):
    path, _, _ = synthetic_slide
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    assert layer.multiscale and layer.rgb and len(layer.data) == 3
    assert tuple(layer.scale) == (0.5, 0.5)


def test_annotation_layer_sits_on_a_pyramid_level_and_reads_the_pixels_under_it(make_napari_viewer, synthetic_slide,
                                                                                 monkeypatch):
    from napari.utils.notifications import notification_manager

    from napari_genselfdiff import _layers

    path, rgb, _ = synthetic_slide
    viewer = make_napari_viewer()
    [image] = viewer.open(str(path), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.image.setCurrentText(image.name)
    assert widget.level.count() == 3 and "1.00 µm/px" in widget.level.itemText(1)

    # Small enough: the layer covers the whole image at the level chosen (here 1, half resolution).
    widget.level.setCurrentIndex(1)
    widget.new_annotation_layer()
    layer = viewer.layers[-1]
    assert layer.name == f"{image.name} annotation" and widget.labels.currentText() == layer.name
    assert layer.data.shape == (512, 512) and _layers.covered_window(image, layer) == (1, 0, 0)
    assert tuple(layer.scale) == (1.0, 1.0) and layer.selected_label == 2
    assert f"{image.name} annotation extent" not in viewer.layers

    # Too large for memory (the limit lowered here): the region in view, its extent drawn, and said.
    limit = _layers.ANNOTATION_MAX_BYTES
    monkeypatch.setattr(_layers, "ANNOTATION_MAX_BYTES", 100_000)
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    viewer.layers.remove(layer)
    viewer.scene.camera.center = (0, 200.0, 300.0)  # µm
    viewer.scene.camera.zoom = 4.0  # screen px per µm
    widget.new_annotation_layer()
    layer = viewer.layers[f"{image.name} annotation"]
    h, w = viewer.canvas.size
    assert layer.data.shape == pytest.approx((h / 4 + 1, w / 4 + 1), abs=2)  # µm at 1 µm/px
    assert any("too large to annotate whole" in m and "outlined" in m for m in messages), messages
    extent = viewer.layers[f"{image.name} annotation extent"]
    _, y0, x0 = _layers.covered_window(image, layer)
    assert (y0, x0) == pytest.approx((200 - h / 8, 300 - w / 8), abs=2)
    # The rectangle's corners are the outer edges of the covered level-1 pixels, in µm.
    corners = np.asarray(extent.data[0])
    np.testing.assert_allclose(corners.min(0), (np.array([y0, x0]) * 2 - 0.5) * 0.5)
    np.testing.assert_allclose(corners.max(0), ((np.array([y0, x0]) + layer.data.shape) * 2 - 0.5) * 0.5)
    layer.data[5:9, 10:30] = 2
    rgb_under, labels, level = _layers.annotation_arrays(image, layer)
    assert level == 1 and labels.shape == layer.data.shape and labels.sum() == 2 * 4 * 20
    np.testing.assert_array_equal(rgb_under, np.asarray(image.data[1][y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]]))

    # The whole image at full resolution: level 0, same grid as the image.
    monkeypatch.setattr(_layers, "ANNOTATION_MAX_BYTES", limit)
    widget.level.setCurrentIndex(0)
    widget.new_annotation_layer()
    assert viewer.layers[-1].data.shape == (1024, 1024)
    assert _layers.covered_window(image, viewer.layers[-1]) == (0, 0, 0)


def _open_sample(viewer, shape=(256, 256), seed=0, name=None):
    """The plugin's sample data (smaller than the menu's, to keep the test fast)."""
    from napari_genselfdiff._sample_data import make_sample

    layers = [getattr(viewer, f"add_{kind}")(data, **meta) for data, meta, kind in make_sample(shape, seed)]
    if name:
        layers[0].name = name
    return layers[0]


def test_sample_data_opens_from_the_menu_command(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "tissue")
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image", "Labels"]
    assert viewer.layers[0].data.shape[:2] == viewer.layers[1].data.shape


def _paint_strokes(layer, truth):
    """What a pathologist does with the brush: a few strokes on nuclei (2) and on background (1)."""
    from scipy import ndimage as ndi

    strokes = np.zeros(truth.shape, np.uint8)
    band = slice(0, truth.shape[0] // 2)
    strokes[band][ndi.binary_erosion(truth[band] > 0, iterations=1)] = 2
    background = ~ndi.binary_dilation(truth > 0, iterations=3)
    rows = (np.arange(truth.shape[0]) % 16 < 3)[:, None]
    strokes[band][(background & rows)[band]] = 1
    layer.data = strokes


def _finetune(qtbot, viewer, widget, image, steps=6, **overrides):
    widget.image.setCurrentText(image.name)
    widget.new_annotation_layer()
    layer = viewer.layers[-1]
    truth = next(lay for lay in viewer.layers if lay.name == "ground truth").data
    _paint_strokes(layer, truth)
    widget.preset.setCurrentText("tiny")
    widget.budget.amount.setValue(steps)
    widget.base.setText("")
    spec = widget.spec()
    assert spec["sparse"] and spec["labels"][0].max() == 2 and spec["classes"] == ["background", "nucleus"]
    widget.start()
    assert widget.runner.running
    return spec


def test_full_flow_paint_finetune_segment(make_napari_viewer, qtbot, tmp_path):
    from napari_genselfdiff.settings import settings

    viewer = make_napari_viewer()
    image = _open_sample(viewer)
    _, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    finetune.out.setText(str(tmp_path / "segmenter.pt"))
    _finetune(qtbot, viewer, finetune, image, steps=6)
    qtbot.waitUntil(lambda: not finetune.runner.running, timeout=180_000)
    result = finetune.result
    assert result is not None and result.steps == 6 and not result.stopped
    assert settings.get("model") == str(tmp_path / "segmenter.pt") == segment.model.text()

    viewer.layers.selection.active = image
    segment.start()
    qtbot.waitUntil(lambda: segment.worker is None, timeout=120_000)
    labels = viewer.layers[f"{image.name} labels"]
    assert type(labels).__name__ == "Labels" and labels.data.shape == image.data.shape[:2]
    assert tuple(labels.scale) == tuple(image.scale) and labels.metadata["genselfdiff"]["label_names"] == [
        "background", "nucleus"]


def test_the_preview_region_is_the_view_else_around_the_strokes_and_bounded():
    from napari_genselfdiff._layers import preview_box

    assert preview_box((10, 20, 300, 400), (0, 0, 50, 50), 1024) == (10, 20, 300, 400)
    # Zoomed far out: around the strokes instead, cut to the cap around their centre.
    assert preview_box((0, 0, 5000, 5000), (100, 200, 300, 2400), 1024) == (100, 788, 300, 1812)
    assert preview_box(None, (100, 200, 300, 400), 1024) == (100, 200, 300, 400)
    assert preview_box((0, 0, 5000, 600), None, 1024) == (1988, 0, 3012, 600)


def test_finetune_plots_loss_and_dice_previews_under_the_strokes_and_continues(make_napari_viewer, qtbot, tmp_path,
                                                                             monkeypatch):
    """The paint-see-correct loop, with training in its own process: the plot fills, the model's
    prediction over the view appears in one preview layer that is updated in place, and Continue
    trains on from the saved model with the strokes painted since."""
    import torch

    from napari_genselfdiff import _layers

    viewer = make_napari_viewer()
    image = _open_sample(viewer)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.out.setText(str(tmp_path / "seg.pt"))
    widget.preview_every.setValue(3)
    spec = widget.spec
    # Validate every 4 steps, so that a short run has Dice points to plot.
    monkeypatch.setattr(widget, "spec", lambda: {**spec(), "overrides": {**spec()["overrides"], "steps_per_epoch": 4}})
    viewer.scene.camera.center = (0, 40.0, 50.0)  # µm: a corner of the 128 µm sample
    viewer.scene.camera.zoom = 8.0  # screen px per µm
    view = _layers.visible_box(viewer, image, 0)
    assert view[2] - view[0] < 256 and view[3] - view[1] < 256
    seen = []  # (step, the preview layer just after the widget handled it)

    def on_preview(p):
        if p.stage == "preview":
            seen.append((p.done, viewer.layers[f"{image.name} preview"]))

    widget.runner.progressed.connect(on_preview)
    _finetune(qtbot, viewer, widget, image, steps=8)
    annotation = viewer.layers[f"{image.name} annotation"]
    assert not widget.continue_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert widget.result.steps == 8 and widget.continue_button.isEnabled()

    assert widget.plot.steps == list(range(1, 9)) and all(v > 0 for v in widget.plot.losses)
    # Strokes: the second axis shows the loss on held-out strokes (their Dice saturates: not shown).
    history = torch.load(tmp_path / "seg.pt", weights_only=True)["history"]
    val_loss = {h["step"]: h["val_loss"] for h in history if "val_loss" in h}
    assert widget.plot.score_steps == [4, 8] and widget.plot.scores == pytest.approx([val_loss[4], val_loss[8]])
    assert widget.plot.score_axes.get_ylabel() == "loss, held-out strokes"
    assert "Dice" not in widget.figures.text() and widget.figures.text().startswith("painted: background ")
    assert [step for step, _ in seen] == [3, 6, 8]
    preview = seen[0][1]
    assert all(layer is preview for _, layer in seen)  # one layer, updated in place
    assert [layer.name for layer in viewer.layers].count(preview.name) == 1
    assert preview.data.shape == (view[2] - view[0], view[3] - view[1]) and preview.data.dtype == np.uint8
    assert set(np.unique(preview.data)) <= {0, 1} and preview.contour > 0
    assert tuple(preview.scale) == tuple(image.scale)
    np.testing.assert_allclose(preview.translate, np.asarray(view[:2]) * image.scale)
    assert preview.metadata["genselfdiff"]["label_names"] == ["background", "nucleus"]
    layers = list(viewer.layers)
    assert layers.index(image) < layers.index(preview) == layers.index(annotation) - 1
    assert viewer.layers.selection.active is annotation  # the brush stays on the strokes

    # Paint more strokes where the model errs (here: the lower half) and continue.
    truth = viewer.layers["ground truth"].data
    more = annotation.data.copy()
    half = slice(truth.shape[0] // 2, None)
    more[half][(truth[half] > 0)] = 2
    annotation.data = more
    seen.clear()
    widget.continue_button.click()
    assert widget.runner.running and not widget.continue_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=180_000)
    assert widget.result.steps == 8 and not widget.result.stopped
    ckpt = torch.load(tmp_path / "seg.pt", weights_only=True)
    assert ckpt["pretrained_from"]["kind"] == "segmentation"
    assert ckpt["pretrained_from"]["path"] == str((tmp_path / "seg.pt").resolve())
    assert ckpt["data"]["annotated_pixels"][1] == int((more == 2).sum())
    assert widget.plot.steps == list(range(1, 17)) and widget.plot.score_steps == [4, 8, 12, 16]
    assert [step for step, _ in seen] == [3, 6, 8] and all(layer is preview for _, layer in seen)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_stop_ends_finetuning_within_seconds_with_a_loadable_model(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                                   mode):

    from genselfdiff.nn.model import load_model

    monkeypatch.setenv("GENSELFDIFF_NAPARI_WORKER", mode)
    viewer = make_napari_viewer()
    image = _open_sample(viewer)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.out.setText(str(tmp_path / "stopped.pt"))
    assert widget.runner.mode == mode
    steps_seen = []
    widget.runner.progressed.connect(lambda p: steps_seen.append(p.done) if p.stage == "finetune" else None)
    _finetune(qtbot, viewer, widget, image, steps=100_000)
    qtbot.waitUntil(lambda: len(steps_seen) >= 2, timeout=120_000)
    widget.stop_button.click()
    # Stop must end the run well before its budget; the bound is generous for a loaded CI machine.
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert widget.result.stopped and widget.result.steps < 1000
    model = load_model(tmp_path / "stopped.pt", "cpu")
    assert model.kind == "segmentation" and model.classes == ["background", "nucleus"]


def test_pretrain_stops_within_seconds_then_draws_images(make_napari_viewer, qtbot, tmp_path, synthetic_pair):

    from genselfdiff.app.synthetic import write_pyramidal_tiff
    from genselfdiff.nn.model import load_model

    (tmp_path / "slides").mkdir()
    write_pyramidal_tiff(tmp_path / "slides" / "a.ome.tif", synthetic_pair[0], mpp=0.5)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Pretrain")
    widget.folder.setText(str(tmp_path / "slides"))
    widget.out.setText(str(tmp_path / "pretrained.pt"))
    widget.preset.setCurrentText("tiny")
    widget.budget.amount.setValue(100_000)
    widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.steps) >= 3, timeout=120_000)
    widget.stop_button.click()
    # Stop must end the run well before its budget; the bound is generous for a loaded CI machine.
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert widget.result.stopped and 3 <= widget.result.steps < 1000
    assert load_model(tmp_path / "pretrained.pt", "cpu").kind == "pretrained"
    assert widget.plot.isVisible() or not widget.isVisible()

    widget.n_samples.setValue(2)
    widget.draw_samples()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    drawn = viewer.layers["drawn by pretrained"]
    assert drawn.rgb and drawn.data.shape == (64, 2 * 64 + 2, 3) and drawn.data.dtype == np.uint8  # a grid of 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A segmentation model fine-tuned for two steps on the sample (fast; not a good model)."""
    from genselfdiff.io.pixelsize import Resolution
    from genselfdiff.train.finetune import FinetuneConfig, finetune
    from napari_genselfdiff._sample_data import make_sample

    (rgb, _, _), (truth, _, _) = make_sample((128, 128))
    strokes = np.where(truth > 0, 2, 1).astype(np.uint8)
    strokes[::2] = 0
    config = FinetuneConfig.from_preset("tiny", sparse=True, class_names=["background", "nucleus"], steps=2,
                                        resolution=Resolution(0, 0.5))
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    finetune([rgb], [strokes], path, config, device="cpu")
    return path


def _segment(qtbot, widget, **options):
    seen = []
    widget.start()
    widget.worker.yielded.connect(seen.append)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    return [m for m in seen if m[0] == "tile"]


def test_batch_mode_segments_every_open_image_and_saves_them(make_napari_viewer, qtbot, tmp_path, tiny_model):
    from napari_genselfdiff._reader import read

    viewer = make_napari_viewer()
    first = _open_sample(viewer, (256, 256), seed=1, name="first")
    second = _open_sample(viewer, (192, 320), seed=2, name="second")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.model.setText(str(tiny_model))
    widget.targets.setCurrentText("every open image")
    widget.out.setText(str(tmp_path / "results"))
    _segment(qtbot, widget)
    for image in (first, second):
        layer = viewer.layers[f"{image.name} labels"]
        assert layer.data.shape == image.data.shape[:2]
        [(saved, meta, kind)] = read(str(tmp_path / "results" / f"{image.name}.ome.zarr"))
        assert kind == "labels" and saved.shape == image.data.shape[:2]
        np.testing.assert_array_equal(np.asarray(saved), layer.data)
    assert "Segmented 2 of 2" in widget.status.text()


def test_flip_averaging_box_gives_the_engines_tta_result(make_napari_viewer, qtbot, tiny_model):
    from genselfdiff.infer.segment import segment
    from genselfdiff.nn.model import load_model

    viewer = make_napari_viewer()
    image = _open_sample(viewer, (128, 128))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.model.setText(str(tiny_model))
    widget.device.setCurrentText("cpu")
    widget.tta.setChecked(True)
    _segment(qtbot, widget)
    want = segment(load_model(tiny_model, "cpu"), image.data, tta=True).labels
    np.testing.assert_array_equal(viewer.layers[f"{image.name} labels"].data, want)


def test_visible_region_only_computes_the_tiles_on_screen(make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    image = _open_sample(viewer, (1024, 1024))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.model.setText(str(tiny_model))
    widget.tile.setValue(128)
    widget.overlap.setValue(16)
    widget.visible_only.setChecked(True)
    viewer.scene.camera.center = (0, 64.0, 64.0)  # µm: the top-left corner of the slide
    viewer.scene.camera.zoom = 8.0
    tiles = _segment(qtbot, widget)
    assert 1 <= len(tiles) <= 9  # of about 80 for the whole image
    assert all(t[2].y < 300 and t[2].x < 300 for t in tiles)
    assert viewer.layers[f"{image.name} labels"].data.shape == (1024, 1024)


def test_a_bad_model_file_is_a_notification_in_plain_words(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    _open_sample(viewer, (128, 128))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    (tmp_path / "model.pt").write_text("not a checkpoint")
    widget.model.setText(str(tmp_path / "model.pt"))
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    _segment(qtbot, widget)
    assert any("model.pt" in m and "bug" not in m for m in messages), messages
    assert "labels" not in " ".join(layer.name for layer in viewer.layers)


@pytest.mark.parametrize("name, key", [("Segment", "model"), ("Fine-tune", "pretrained")])
def test_a_closed_widget_ignores_new_settings(make_napari_viewer, qtbot, name, key):
    from qtpy import sip

    from napari_genselfdiff.settings import settings

    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    viewer.window.remove_dock_widget(dock)
    widget.deleteLater()
    qtbot.wait(50)
    assert sip.isdeleted(widget)
    settings.set(key, "/models/new.pt")  # e.g. a model saved by another widget
    settings.set(key, "/models/newer.pt")


@pytest.mark.parametrize("name", ["Fine-tune", "Segment"])
def test_pixel_size_field_is_prefilled_from_the_image_layers_scale(make_napari_viewer, name):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    rgb = np.zeros((64, 64, 3), np.uint8)
    sample = _open_sample(viewer, (128, 128))  # the sample's scale: 0.5 µm/px
    unknown = viewer.add_image(rgb, rgb=True, name="plain png")  # scale 1: unknown
    scaled = viewer.add_image(rgb, rgb=True, name="at 40x", scale=(0.25, 0.25))
    for layer, text in ((sample, "0.5"), (unknown, ""), (scaled, "0.25")):
        if name == "Fine-tune":
            widget.image.setCurrentText(layer.name)
        else:
            viewer.layers.selection.active = layer
        assert widget.pixel_size.text() == text
    widget.pixel_size.setText("0.3")  # editable; the value reaches the engine
    if name == "Fine-tune":
        assert widget.pixel_size.value("x") == 0.3
    else:
        [item] = widget.items()
        assert item["image"].mpp == 0.3 and item["image"].notes  # 0.3 for a layer at 0.25: said so


def test_a_bad_pixel_size_in_a_widget_is_one_sentence_naming_the_image(make_napari_viewer):
    from genselfdiff.errors import UserError

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="plain png")
    widget.pixel_size.setText("-2")
    with pytest.raises(UserError, match="given for plain png must be a positive number"):
        widget.items()


def test_objects_box_adds_the_engines_objects_as_a_layer_and_the_reader_shows_saved_ones(make_napari_viewer, qtbot,
                                                                                      tmp_path, tiny_model):
    from genselfdiff.infer.segment import segment
    from genselfdiff.nn.model import load_model
    from napari_genselfdiff._reader import read

    viewer = make_napari_viewer()
    image = viewer.add_image(np.asarray(__import__("napari_genselfdiff._sample_data", fromlist=["x"]).make_sample(
        (96, 96))[0][0]), name="he", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.model.setText(str(tiny_model))
    widget.instances.setChecked(True)
    widget.out.setText(str(tmp_path))
    _segment(qtbot, widget)
    want = segment(load_model(tiny_model, "cpu"), image.data, instances=True).objects.ids
    shown = np.asarray(viewer.layers["he objects"].data)
    from genselfdiff.objects.split import first_pixel_order

    assert (first_pixel_order(shown) == want).all()
    layers = read(tmp_path / "he.ome.zarr")
    assert [meta["name"] for _, meta, _ in layers] == ["he", "he objects"]


def _class_under(layer, pixel) -> str:
    """What napari's status bar says about ``layer`` with the cursor on its data pixel ``pixel``."""
    world = np.asarray(layer.data_to_world(pixel))
    return layer.get_status(world, world=True)["coordinates"]


def _nucleus_color(layer, value) -> tuple:
    return tuple(np.round(layer.colormap.map(np.array([value]))[0][:3], 3))


def test_strokes_on_two_images_train_together_and_continue_counts_changed_strokes(make_napari_viewer, qtbot,
                                                                                 tmp_path, monkeypatch):
    """The pathologist's loop across images: strokes on two images, both ticked under 'Train on',
    one model trained on both; the preview (outlines) under the strokes in the same colours, class
    names on hover; Continue says how many painted pixels changed class, and refuses a model of
    other classes without touching its file."""
    import torch
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import Qt

    monkeypatch.setenv("GENSELFDIFF_NAPARI_WORKER", "thread")  # no process start: a faster test
    viewer = make_napari_viewer()
    first = _open_sample(viewer, (128, 128), seed=1, name="first")
    first_truth = viewer.layers[-1].data
    second = _open_sample(viewer, (128, 128), seed=2, name="second")
    second_truth = viewer.layers[-1].data
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.out.setText(str(tmp_path / "seg.pt"))
    widget.preset.setCurrentText("tiny")
    widget.budget.amount.setValue(4)
    widget.preview_every.setValue(2)
    for image, truth in ((first, first_truth), (second, second_truth)):
        widget.image.setCurrentText(image.name)
        widget.new_annotation_layer()
        _paint_strokes(viewer.layers[f"{image.name} annotation"], truth)
    strokes = [viewer.layers[f"{im.name} annotation"] for im in (first, second)]
    assert widget.labels.currentText() == strokes[1].name  # the selected image's own annotation

    # Both images are ticked (each got its annotation layer here); unticking one leaves it out.
    assert [(im.name, lab.name) for im, lab in widget.trainset.chosen()] == [
        ("first", "first annotation"), ("second", "second annotation")]
    widget.trainset.item(0).setCheckState(Qt.Unchecked)
    assert widget.spec()["pairs"] == [("second", "second annotation")]
    widget.trainset.item(0).setCheckState(Qt.Checked)
    widget.image.setCurrentText(first.name)  # choosing an image chooses its annotation layer
    assert widget.labels.currentText() == strokes[0].name
    widget.image.setCurrentText(second.name)
    spec = widget.spec()
    assert len(spec["images"]) == 2 and [lab.max() for lab in spec["labels"]] == [2, 2]

    widget.start()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    assert widget.result.steps == 4 and not widget.result.stopped
    painted = [int((lay.data > 0).sum()) for lay in strokes]
    annotated = torch.load(tmp_path / "seg.pt", weights_only=True)["data"]["annotated_pixels"]
    assert sum(annotated) == sum(painted)  # the strokes of both images, nothing else
    assert "of 2 images" in widget.figures.text() and "Dice" not in widget.figures.text()

    # The preview: outlines under the selected image's strokes, nucleus in the strokes' colour.
    preview = viewer.layers["second preview"]
    layers = list(viewer.layers)
    assert preview.contour > 0 and layers.index(preview) == layers.index(strokes[1]) - 1
    assert _nucleus_color(preview, 1) == _nucleus_color(strokes[1], 2)
    # Hovering names the class, not only the id.
    y, x = np.argwhere(strokes[1].data == 1)[0]
    assert "class: background" in _class_under(strokes[1], (y, x))
    y, x = np.argwhere(strokes[1].data == 2)[0]
    assert "class: nucleus" in _class_under(strokes[1], (y, x))
    if (preview.data == 1).any():
        assert "class: nucleus" in _class_under(preview, tuple(np.argwhere(preview.data == 1)[0]))

    # Correct 25 nucleus pixels of the first image to background, then Continue.
    more = strokes[0].data.copy()
    flip = np.argwhere(more == 2)[:25]
    more[flip[:, 0], flip[:, 1]] = 1
    strokes[0].data = more
    messages = []
    notification_manager.notification_ready.connect(lambda n: messages.append(str(n.message)))
    widget.continue_button.click()
    assert "25 painted pixels changed class since the last round" in widget.figures.text()
    assert any(m.startswith("25 painted pixels changed class") for m in messages), messages
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)
    assert widget.result.steps == 4

    # A model of other classes: one sentence, nothing started, its file untouched.
    saved = (tmp_path / "seg.pt").read_bytes()
    widget.classes.setText("background, tumour")
    messages.clear()
    widget.continue_button.click()
    assert not widget.runner.running
    assert any("segments background, nucleus" in m and "background, tumour" in m for m in messages), messages
    assert (tmp_path / "seg.pt").read_bytes() == saved


def test_an_implausible_preview_is_said_in_one_line(make_napari_viewer):
    viewer = make_napari_viewer()
    image = _open_sample(viewer, (64, 64))
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.image.setCurrentText(image.name)
    widget.new_annotation_layer()
    widget._preview_on = (image, 0, viewer.layers[-1])
    payload = {"labels": np.ones((64, 64), np.uint8), "origin": (0, 0), "step": 5,
               "classes": ["background", "nucleus"], "colors": [[0, 0, 0], [255, 0, 0]]}
    widget._show_preview(payload)
    assert "calls 100 % of the preview nucleus" in widget.warning.text()
    payload["labels"] = np.zeros((64, 64), np.uint8)
    widget._show_preview(payload)
    assert "finds no nucleus in the preview" in widget.warning.text()
    payload["labels"][:10] = 1
    widget._show_preview(payload)
    assert widget.warning.text() == ""


def test_segment_says_area_shares_and_objects_under_the_strokes_in_their_colours(make_napari_viewer, qtbot,
                                                                                 tiny_model, tmp_path):
    from genselfdiff.infer.segment import segment
    from genselfdiff.io.labels import default_colors
    from genselfdiff.nn.model import load_model
    from napari_genselfdiff import _figures, _layers

    viewer = make_napari_viewer()
    image = _open_sample(viewer, (128, 128))
    strokes, _ = _layers.new_annotation_layer(viewer, image, 0, ["background", "nucleus"], default_colors(2))
    strokes.data[10:12, 10:40] = 1
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.model.setText(str(tiny_model))
    widget.instances.setChecked(True)
    widget.out.setText(str(tmp_path))
    viewer.layers.selection.active = image
    _segment(qtbot, widget)
    want = segment(load_model(tiny_model, "cpu"), image.data, instances=True)
    counts = _figures.class_counts(want.labels, 2)
    line = f"{image.name}: " + _figures.area_line(counts, ["background", "nucleus"], want.objects.counts)
    assert line in widget.status.text().splitlines()
    assert f"{want.objects.counts['nucleus']} nucleus object" in line
    assert (_figures.implausible(counts, ["background", "nucleus"], image.name) or "") in widget.status.text()
    result = viewer.layers[f"{image.name} labels"]
    layers = list(viewer.layers)
    assert layers.index(result) < layers.index(strokes)  # the strokes stay on top
    assert _nucleus_color(result, 1) == _nucleus_color(strokes, 2)
    y, x = np.argwhere(np.asarray(result.data) == want.labels.max())[0]
    assert f"class: {['background', 'nucleus'][want.labels.max()]}" in _class_under(result, (y, x))
