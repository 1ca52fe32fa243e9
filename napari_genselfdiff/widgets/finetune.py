"""Fine-tune widget: paint a few strokes, click once, get a segmentation model.

The widget only gathers what the engine needs: the painted labels and the image pixels
under them (read at the pyramid level they were painted at), the class names and the base
model. Training runs in a separate process; the saved model becomes the Segment widget's.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout

from .. import _layers
from ..settings import settings
from genselfdiff.errors import UserError

from ._common import PRESETS, BudgetEdit, DeviceBox, JobWidget, LayerBox, PathEdit, PixelSizeEdit, tell, tell_error

SPARSE, DENSE = "scribbles (0 = unpainted, 1 = background, 2 = first class…)", "complete masks (0 = background)"


class FinetuneWidget(JobWidget):
    stopping = "Stopping: saving the model…"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.image = LayerBox(napari_viewer, "image")
        self.image.currentTextChanged.connect(self._fill_levels)
        self.pixel_size = PixelSizeEdit()
        self.image.currentTextChanged.connect(lambda *_: self.pixel_size.show_layer(self.image.layer()))
        self.pixel_size.show_layer(self.image.layer())
        self.labels = LayerBox(napari_viewer, "labels")
        self.labels.currentTextChanged.connect(self._guess_mode)
        self.level = QComboBox()
        self.level.setToolTip("The pyramid level to paint at: the model learns, and later segments, at this scale")
        self.region = QComboBox()
        self.region.addItems(["current view", "whole image"])
        self.new_button = QPushButton("New annotation layer")
        self.new_button.clicked.connect(self.new_annotation_layer)
        self.classes = QLineEdit(settings.get("classes", "background, nucleus"))
        self.classes.setToolTip("Comma-separated; the first is the background")
        self.mode = QComboBox()
        self.mode.addItems([SPARSE, DENSE])
        self.base = PathEdit("open", "Checkpoints (*.pt)", "none: train from scratch")
        self.base.setText(settings.get("pretrained", ""))
        self.base.changed.connect(lambda text: self.preset.setEnabled(not text))
        self.preset = QComboBox()
        self.preset.addItems(PRESETS)
        self.preset.setCurrentText(settings.get("finetune_preset", "auto"))
        self.preset.setToolTip("Network size when training from scratch (a base model brings its own)")
        self.preset.setEnabled(not self.base.text())
        self.budget = BudgetEdit(500)
        self.device = DeviceBox()
        self.out = PathEdit("save", "Checkpoints (*.pt)", "where to save the model (.pt)")
        self.out.setText(settings.get("finetune_out", ""))
        self.run_button, self.stop_button = QPushButton("Fine-tune"), QPushButton("Stop")
        self.run_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self.dice = QLabel("")

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Pixel size (µm/px)", self.pixel_size)
        form.addRow("Annotate at", self.level)
        new_row = QHBoxLayout()
        new_row.addWidget(self.region)
        new_row.addWidget(self.new_button, 1)
        form.addRow("Over the", new_row)
        form.addRow("Labels", self.labels)
        form.addRow("Classes", self.classes)
        form.addRow("Labels are", self.mode)
        form.addRow("Base model", self.base)
        form.addRow("Preset", self.preset)
        form.addRow("Train for", self.budget)
        form.addRow("Device", self.device)
        form.addRow("Save as", self.out)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addWidget(self.dice)
        layout.addStretch(1)
        settings.changed.connect(self._on_setting)
        self.result = None  # the last FinetuneResult
        self._fill_levels()
        self._guess_mode()

    def class_names(self) -> list:
        names = [c.strip() for c in self.classes.text().split(",") if c.strip()]
        return names if len(names) >= 2 else ["background", "object"]

    def _fill_levels(self, *_):
        self.level.clear()
        layer = self.image.layer()
        if layer is None:
            return
        mpp = _layers.layer_mpp(layer)
        for i, (lv, d) in enumerate(zip(_layers.image_levels(layer), _layers.downsamples(_layers.image_levels(layer)))):
            size = f"{lv.shape[1]}×{lv.shape[0]}"
            self.level.addItem(f"level {i}: {size}" + (f", {mpp * d:.2f} µm/px" if mpp else ""))

    def _guess_mode(self, *_):
        layer = self.labels.layer()
        names = ((layer.metadata.get(_layers.META) or {}).get("label_names") or []) if layer is not None else []
        if names:
            self.mode.setCurrentText(SPARSE if names[0] == "unlabelled" else DENSE)
            classes = names[1:] if names[0] == "unlabelled" else names
            self.classes.setText(", ".join(classes))

    def _on_setting(self, key, value):
        try:
            if key == "pretrained":
                self.base.setText(value)
        except RuntimeError:  # this widget was closed
            settings.changed.disconnect(self._on_setting)

    def new_annotation_layer(self):
        from genselfdiff.model import default_colors

        image = self.image.layer()
        if image is None:
            return tell_error("Open an image first (File > Open, or File > Open Sample > GenSelfDiff).")
        classes = self.class_names()
        try:
            layer = _layers.new_annotation_layer(self.viewer, image, max(self.level.currentIndex(), 0),
                                                 "view" if self.region.currentIndex() == 0 else "image",
                                                 classes, default_colors(len(classes)))
        except ValueError as e:
            return tell_error(str(e))
        self.labels.setCurrentText(layer.name)
        self.mode.setCurrentText(SPARSE)
        tell(f"Paint with label 1 for {classes[0]}, 2 for {classes[1]}" + (", …" if len(classes) > 2 else "") + ".")

    def spec(self) -> dict:
        """What the engine needs, read from the layers; ValueError says what is missing."""
        image, labels = self.image.layer(), self.labels.layer()
        if image is None or labels is None:
            raise ValueError("Choose an image and a Labels layer painted over it (or click 'New annotation layer').")
        rgb, lab, level = _layers.annotation_arrays(image, labels)
        if not lab.any():
            raise ValueError(f"{labels.name} has nothing painted over {image.name}; paint a few strokes first.")
        out = self.out.text() or str(Path(settings.get("pretrain_folder") or Path.home()) / f"{image.name}-segmenter.pt")
        self.out.setText(out)
        mpp = self.pixel_size.value(image.name)  # at level 0; the arrays are at the painted level
        d = _layers.downsamples(_layers.image_levels(image))[level]
        return {
            "images": [rgb], "labels": [lab], "out": out, "classes": self.class_names(),
            "sparse": self.mode.currentText() == SPARSE, "pretrained": self.base.text() or None,
            "preset": self.preset.currentText(), "device": self.device.currentText(),
            "resolution": {"level": level, "mpp": mpp * d if mpp else None}, "pixel_size": mpp * d if mpp else None,
            **self.budget.spec(),
        }

    def start(self):
        try:
            spec = self.spec()
        except (ValueError, UserError) as e:
            return tell_error(str(e))
        settings.set("classes", ", ".join(spec["classes"]))
        settings.set("finetune_out", spec["out"])
        settings.set("finetune_preset", spec["preset"])
        self.dice.setText("")
        self.runner.start("finetune", spec)
        self.progress.start("Fine-tuning (starting)…")
        self._set_running(True)

    def _set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.new_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _on_progress(self, p):
        text = f"{p.stage}: step {p.done}" + (f" / {p.total}" if p.total else "")
        if "loss" in p.metrics:
            text += f" · loss {float(p.metrics['loss']):.4f}"
        dice = p.metrics.get("val_dice")
        if dice is not None and dice == dice:  # NaN until the first validation
            self.dice.setText(f"Validation Dice: {float(dice):.3f}")
        self.progress.update(p, text)

    def _on_finished(self, result):
        self._set_running(False)
        self.result = result
        how = "stopped" if result.stopped else "finished"
        self.progress.close(f"Fine-tuning {how} after {result.steps} steps; saved {result.path}.")
        if result.best_dice is not None:
            self.dice.setText(f"Best validation Dice: {result.best_dice:.3f}")
        settings.set("model", str(result.path))
        tell(f"Fine-tuning {how}: {result.path} is now the Segment widget's model.")

    def job_name(self) -> str:
        return "Fine-tuning"
