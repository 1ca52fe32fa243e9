"""Segment widget: run a model over the selected image or every open image.

The widget turns the user's choices into the engine's SegmentConfig (:meth:`SegmentWidget.spec`)
and runs the engine's tiled inference in a thread worker; the engine pastes each finished tile
into a display pyramid, shown as a Labels layer named after its image at the scale of the level
the model works at, so the result fills in over the slide while it runs. When it ends, one
line per image says the area share per class (and the objects counted), and a warning says
when a result is implausible (most of the image one object class, or none at all).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QPushButton, QSpinBox, QVBoxLayout, QWidget
from superqt import QCollapsible

from genselfdiff.infer.config import SegmentConfig
from genselfdiff.progress import Progress

from .. import _figures, _layers
from ..settings import settings
from ..workers import ProgressView, segment_worker
from ._common import DeviceBox, PathEdit, PixelSizeEdit, progress_row, tell, tell_error, tell_warning

SELECTED, ALL = "the selected image", "every open image"
AUTO_TILE, AUTO_OVERLAP = 0, -16  # the spin boxes' "auto" (the overlap's steps of 16 then start at 0)
REFRESH_SECONDS = 0.3


class SegmentWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.model = PathEdit("open", "Checkpoints (*.pt)", "a fine-tuned model (.pt)")
        self.model.setText(settings.get("model", ""))
        self.targets = QComboBox()
        self.targets.addItems([SELECTED, ALL])
        self.visible_only = QCheckBox("visible region only (a quick look)")
        # The selected image's; with "every open image" it fills in only for images of unknown size.
        self.pixel_size = PixelSizeEdit()
        napari_viewer.layers.selection.events.active.connect(self._show_pixel_size)
        self._show_pixel_size()
        self.tta = QCheckBox("average over flips (4x slower)")
        self.tta.setToolTip("Test-time augmentation: each tile is also run flipped left-right, up-down and both, "
                            "and the class probabilities are averaged")
        self.tta.setChecked(bool(settings.get("segment_tta", False)))
        self.instances = QCheckBox("split into objects (one id per nucleus or gland)")
        self.instances.setToolTip("Also split every foreground class into objects, shown as a second Labels layer; "
                                  "with 'Save to', written beside the class labels")
        self.instances.setChecked(bool(settings.get("segment_instances", False)))
        self.out = PathEdit("dir", placeholder="optional: folder for OME-Zarr results")
        self.out.setText(settings.get("segment_out", ""))
        # "auto" (each spin box's lowest value) leaves the choice to the engine (None in the config).
        self.tile = QSpinBox()
        self.tile.setRange(AUTO_TILE, 8192)
        self.tile.setSingleStep(64)
        self.tile.setSpecialValueText("auto")
        self.tile.setValue(int(settings.get("tile", AUTO_TILE)))
        self.overlap = QSpinBox()
        self.overlap.setRange(AUTO_OVERLAP, 1024)  # below 0, which is a valid overlap
        self.overlap.setSingleStep(16)
        self.overlap.setSpecialValueText("auto")
        self.overlap.setValue(max(int(settings.get("overlap", AUTO_OVERLAP)), AUTO_OVERLAP))
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(SegmentConfig.batch)  # the engine's default
        self.device = DeviceBox()
        advanced = QFormLayout()
        advanced.addRow("Tile (px)", self.tile)
        advanced.addRow("Overlap (px)", self.overlap)
        advanced.addRow("Batch", self.batch)
        advanced.addRow("Device", self.device)
        box = QWidget()
        box.setLayout(advanced)
        self.advanced = QCollapsible("Advanced")
        self.advanced.addWidget(box)
        self.run_button, self.stop_button = QPushButton("Segment"), QPushButton("Stop")
        self.run_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self.bar, self.status = progress_row()

        form = QFormLayout()
        form.addRow("Model", self.model)
        form.addRow("Segment", self.targets)
        form.addRow("", self.visible_only)
        form.addRow("Pixel size (µm/px)", self.pixel_size)
        form.addRow("", self.tta)
        form.addRow("", self.instances)
        form.addRow("Save to", self.out)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.advanced)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.progress = ProgressView(self.bar, self.status)
        self.worker, self._stop = None, None
        self.results = {}  # image name -> {"image_layer", "layer", ...} of the current run
        settings.changed.connect(self._on_setting)

    def _on_setting(self, key, value):
        try:
            if key == "model":
                self.model.setText(value)
        except RuntimeError:  # this widget was closed
            settings.changed.disconnect(self._on_setting)

    def image_layers(self) -> list:
        images = [layer for layer in self.viewer.layers if type(layer).__name__ == "Image" and layer.rgb]
        if self.targets.currentText() == ALL:
            return images
        selected = self.viewer.layers.selection.active
        if selected in images:
            return [selected]
        return images[-1:]  # nothing suitable selected: the top image

    def _show_pixel_size(self, event=None):
        layer = getattr(event, "value", None) or self.viewer.layers.selection.active
        if layer is not None and type(layer).__name__ == "Image":
            try:
                self.pixel_size.show_layer(layer)
            except RuntimeError:  # this widget was closed
                self.viewer.layers.selection.events.active.disconnect(self._show_pixel_size)

    def items(self) -> list:
        from genselfdiff.io.slides import as_slide, with_pixel_size

        items = []
        for layer in self.image_layers():
            meta = layer.metadata.get(_layers.META) or {}
            image = as_slide(_layers.image_levels(layer))
            image.path, image.mpp = Path(meta.get("path") or layer.name), _layers.layer_pixel_size(layer)
            if self.targets.currentText() == SELECTED or image.mpp is None:
                image = with_pixel_size(image, self.pixel_size.value(layer.name))
            item = {"key": layer.name, "image": image, "layer": layer}
            if self.visible_only.isChecked():
                item["region0"] = _layers.visible_box(self.viewer, layer)
                if item["region0"] is None:
                    continue
            items.append(item)
        return items

    def config(self) -> SegmentConfig:
        """The user's choices as the engine's config (auto fields stay None: the engine decides)."""
        tile, overlap = self.tile.value(), self.overlap.value()
        return SegmentConfig(tile=None if tile == AUTO_TILE else tile, overlap=None if overlap == AUTO_OVERLAP else overlap,
                             batch=self.batch.value(), tta=self.tta.isChecked(), instances=self.instances.isChecked(),
                             device=self.device.currentText())

    def spec(self) -> dict:
        """What the engine needs: the model, the images (:meth:`items`), the config and the output
        folder. ValueError says what is missing; UserError comes from the engine."""
        model = self.model.text()
        if not model:
            raise ValueError("Choose a model: fine-tune one with the Fine-tune widget, or open a saved .pt file.")
        items = self.items()
        if not items:
            raise ValueError("Open an RGB image to segment (or pan it into view for 'visible region only').")
        out_dir = self.out.text() or None
        if out_dir and self.visible_only.isChecked():
            raise ValueError("'Visible region only' is a quick look and saves nothing; clear 'Save to' or untick it.")
        return {"model": model, "items": items, "config": self.config(), "out": out_dir}

    def start(self):
        from genselfdiff.errors import UserError

        try:
            spec = self.spec()
        except (ValueError, UserError) as e:
            return tell_error(str(e))
        for key, value in (("model", spec["model"]), ("segment_out", self.out.text()), ("tile", self.tile.value()),
                           ("overlap", self.overlap.value()), ("segment_tta", self.tta.isChecked()),
                           ("segment_instances", self.instances.isChecked())):
            settings.set(key, value)
        self.results = {item["key"]: {"image_layer": item.pop("layer")} for item in spec["items"]}
        self.worker, self._stop = segment_worker(spec["model"], spec["items"], spec["config"], spec["out"])
        self.worker.yielded.connect(self._on_yield)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.progress.start("Loading the model…")
        self._set_running(True)
        self.worker.start()

    def stop(self):
        if self.worker is not None:
            self._stop.set()
            self.worker.quit()
            self.status.setText("Stopping after the current tiles…")

    def _set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _on_yield(self, message):
        kind, key = message[0], message[1] if len(message) > 1 else None
        if kind == "model":
            self.classes, self.colors = key.classes, key.colors
        elif kind == "tile":
            self._add_tile(key, message[2], message[3])
        elif kind == "objects":
            self._add_objects(key, message[2], message[3])
        elif kind == "end":
            entry = self.results[key]
            entry["done"] = True
            if "layer" in entry:
                entry["layer"].refresh()
            result = message[2]
            if result is not None and result.path is not None and not result.stopped:
                entry["saved"] = result.path
            if result is not None and result.objects is not None:
                entry["objects"] = dict(result.objects.counts)
        elif kind == "failed":
            self.results[key]["error"] = message[2]
            tell_error(message[2])

    def _add_tile(self, key: str, tile, merged):
        """The engine has pasted ``tile`` into ``merged`` (its display pyramid): show it."""
        entry = self.results[key]
        if "layer" not in entry:
            entry["layer"] = self._result_layer(entry["image_layer"], tile, merged)
            entry["refreshed"] = time.monotonic()
            entry["counts"] = 0
        entry["counts"] = entry["counts"] + _figures.class_counts(tile.labels, len(self.classes))
        if time.monotonic() - entry["refreshed"] > REFRESH_SECONDS or tile.done == tile.total:
            entry["layer"].refresh()
            entry["refreshed"] = time.monotonic()
        self.progress.update(Progress(f"Segmenting {key}", tile.done, tile.total), f"{key}: tile {tile.done} / {tile.total}")

    def _result_layer(self, image_layer, tile, merged):
        """A Labels layer over the engine's display pyramid of the processing level, replacing the
        last run's for this image."""
        scale, translate = _layers.level_transform(image_layer, tile.level)
        name = f"{image_layer.name} labels"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        annotation = _layers.annotation_of(self.viewer, image_layer)
        colors = _layers.same_colors(self.classes, self.colors, annotation)
        layer = self.viewer.add_labels(
            merged.data, name=name, scale=scale, translate=translate, multiscale=len(merged.levels) > 1,
            opacity=0.6, **_layers.labels_kwargs(self.classes, colors, segmented=image_layer.name,
                                   **_layers.placement(image_layer, tile.level)))
        if annotation is not None:  # under the strokes, which stay visible
            self.viewer.layers.move(self.viewer.layers.index(layer), self.viewer.layers.index(annotation))
        return layer

    def _add_objects(self, key: str, ids, level: int):
        """The objects as a Labels layer beside the class labels (random colours: one per object)."""
        image_layer = self.results[key]["image_layer"]
        scale, translate = _layers.level_transform(image_layer, level)
        name = f"{image_layer.name} objects"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.results[key]["objects_layer"] = self.viewer.add_labels(ids, name=name, scale=scale,
                                                                    translate=translate, opacity=0.5)

    def _on_error(self, error):
        from genselfdiff.errors import UserError

        self.progress.close("")
        if not isinstance(error, UserError):  # a bug: keep its traceback in the log
            logging.getLogger(__name__).error("segmentation failed", exc_info=(type(error), error, error.__traceback__))
        tell_error(str(error), isinstance(error, UserError), "Segmentation")

    def _on_finished(self):
        self._set_running(False)
        done = [k for k, e in self.results.items() if e.get("done")]
        saved = [str(e["saved"]) for e in self.results.values() if "saved" in e]
        failed = [k for k, e in self.results.items() if "error" in e]
        text = ("Stopped. " if self._stop.is_set() else "") + f"Segmented {len(done)} of {len(self.results)} image(s)."
        text += f" Saved {', '.join(saved)}." if saved else ""
        text += f" Failed: {', '.join(failed)}." if failed else ""
        for key, entry in self.results.items():
            if entry.get("done") and "counts" in entry:
                text += f"\n{key}: " + _figures.area_line(entry["counts"], self.classes, entry.get("objects"))
                warning = _figures.implausible(entry["counts"], self.classes, key)
                if warning:
                    text += f"\n{warning}"
                    tell_warning(warning)
        self.progress.close(text)
        self.worker = None
        if done:
            tell(text)

    def closeEvent(self, event):
        self.stop()
        super().closeEvent(event)
