"""Fine-tune widget: paint a few strokes, click once, get a segmentation model.

The widget only gathers what the engine needs: the painted labels and the image pixels
under them (read at the pyramid level they were painted at), the class names and the base
model. Training runs in a separate process; the saved model becomes the Segment widget's.

While it trains, the plot shows the loss and the validation Dice, and every few hundred
steps the engine's prediction over the region in view appears in a "<image> preview"
layer under the strokes: paint where it errs, then Continue from the model just saved.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout

from genselfdiff.errors import UserError

from .. import _layers
from ..settings import settings
from ._common import (
    PRESETS,
    BudgetEdit,
    DeviceBox,
    JobWidget,
    LayerBox,
    PathEdit,
    PixelSizeEdit,
    TrainingPlot,
    tell,
    tell_error,
)

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
        # People paint strokes here: the engine's default for them, finetune.SPARSE_STEPS (not
        # imported: that loads torch when the plugin's menu is built).
        self.budget = BudgetEdit(1000)
        self.device = DeviceBox()
        self.out = PathEdit("save", "Checkpoints (*.pt)", "where to save the model (.pt)")
        self.out.setText(settings.get("finetune_out", ""))
        self.preview_every = QSpinBox()
        self.preview_every.setRange(0, 1_000_000)
        self.preview_every.setSingleStep(50)
        self.preview_every.setSpecialValueText("never")
        self.preview_every.setSuffix(" steps")
        self.preview_every.setValue(int(settings.get("preview_every", 200)))
        self.preview_every.setToolTip("How often to show the model's prediction over the region in view "
                                      "(each preview takes a moment of training time)")
        self.run_button, self.stop_button = QPushButton("Fine-tune"), QPushButton("Stop")
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip("Train on from the model just saved, with the strokes as they are now. Correct "
                                        "both ways: objects the preview misses and background it calls an object "
                                        "(correcting one kind only teaches the model to overdo the other)")
        self.run_button.clicked.connect(self.start)
        self.continue_button.clicked.connect(self.continue_training)
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self.continue_button.setEnabled(False)
        self.dice = QLabel("")
        self.plot = TrainingPlot(napari_viewer.theme, score="validation Dice")
        self._score = "val_dice"  # what the plot's second axis shows (the loss for strokes)

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
        form.addRow("Preview every", self.preview_every)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.continue_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addWidget(self.dice)
        layout.addWidget(self.plot)
        layout.addStretch(1)
        settings.changed.connect(self._on_setting)
        self.result = None  # the last FinetuneResult
        self._steps_before = 0  # steps of the runs this one continues (the plot's x goes on)
        self._preview_on = None  # (image layer, level, annotation layer) of the running job
        self._fill_levels()
        self._guess_mode()

    def class_names(self) -> list:
        """The names typed, background first; fewer than two: the engine's names for two classes."""
        from genselfdiff.io.labels import default_class_names

        names = [c.strip() for c in self.classes.text().split(",") if c.strip()]
        return names if len(names) >= 2 else default_class_names(2)

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
        from genselfdiff.io.labels import default_colors

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
        every = self.preview_every.value()
        return {
            "images": [rgb], "labels": [lab], "out": out, "classes": self.class_names(),
            "sparse": self.mode.currentText() == SPARSE, "pretrained": self.base.text() or None,
            "preset": self.preset.currentText(), "device": self.device.currentText(),
            "resolution": {"level": level, "mpp": mpp * d if mpp else None}, "pixel_size": mpp * d if mpp else None,
            "overrides": {"preview_every": every}, "preview": self.preview_region(level) if every else None,
            **self.budget.spec(),
        }

    def preview_region(self, level: int):
        """The pixels to show the model's prediction on: the part of the image in view (or, zoomed
        far out, around the strokes), read at the training level; None when there are none."""
        from genselfdiff.train.finetune import PREVIEW_MAX_SIDE

        image, labels = self.image.layer(), self.labels.layer()
        box = _layers.preview_box(_layers.visible_box(self.viewer, image, level),
                                  _layers.painted_box(image, labels), PREVIEW_MAX_SIDE)
        if box is None:
            return None
        y0, x0, y1, x1 = box
        rgb = _layers.read_window(_layers.image_levels(image)[level], y0, x0, y1 - y0, x1 - x0)
        return {"image": rgb, "origin": (y0, x0)}

    def start(self, *_, base: str = None):
        """Fine-tune from the base model, or from ``base`` (a model saved by the last run)."""
        try:
            spec = self.spec()
        except (ValueError, UserError) as e:
            return tell_error(str(e))
        settings.set("classes", ", ".join(spec["classes"]))
        settings.set("finetune_out", spec["out"])
        settings.set("finetune_preset", spec["preset"])
        settings.set("preview_every", self.preview_every.value())
        if base is None:
            self._steps_before = 0
            self.plot.clear()
        else:
            spec["pretrained"] = base
            self._steps_before += self.result.steps
        self._preview_on = (self.image.layer(), spec["resolution"]["level"], self.labels.layer())
        # Strokes along object cores reach Dice 1 within a few steps; their loss still moves
        # (the engine keeps the latest network either way).
        self._score = "val_loss" if spec["sparse"] else "val_dice"
        self.plot.set_score("validation loss" if spec["sparse"] else "validation Dice", unit_range=not spec["sparse"])
        self.dice.setText("")
        self.runner.start("finetune", spec)
        self.progress.start("Fine-tuning (starting)…" if base is None else f"Continuing from {Path(base).name}…")
        self._set_running(True)

    def continue_training(self):
        """Train on from the model the last run saved, with the strokes painted since."""
        if self.result is None or not Path(self.result.path).exists():
            return tell_error("Fine-tune a model first: Continue trains on from the model the last run saved.")
        self.start(base=str(self.result.path))

    def _set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.new_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.continue_button.setEnabled(not running and self.result is not None)

    def _on_progress(self, p):
        if p.stage == "preview":
            return self._show_preview(p.payload)
        step = self._steps_before + p.done
        text = f"{p.stage}: step {p.done}" + (f" / {p.total}" if p.total else "")
        if "loss" in p.metrics:
            text += f" · loss {float(p.metrics['loss']):.4f}"
        dice, loss = p.metrics.get("val_dice"), p.metrics.get("val_loss")
        if dice is not None and dice == dice:  # NaN until the first validation
            self.dice.setText(f"Validation loss: {float(loss):.3f} (Dice {float(dice):.3f})"
                              if self._score == "val_loss" and loss is not None else f"Validation Dice: {float(dice):.3f}")
        if isinstance(p.payload, dict) and self._score in p.payload:  # an epoch's validation
            self.plot.add_score(step, float(p.payload[self._score]))
        elif p.stage == "finetune" and "loss" in p.metrics:
            self.plot.add(step, float(p.metrics["loss"]))
        self.progress.update(p, text)

    def _show_preview(self, payload):
        if not payload or self._preview_on is None:
            return  # too large to travel (it never is at the engine's size cap)
        image, level, annotation = self._preview_on
        if image is None or image not in self.viewer.layers:
            return  # the image was closed meanwhile
        _layers.show_preview(self.viewer, image, level, payload, below=annotation)

    def _on_finished(self, result):
        self.result = result
        self._set_running(False)
        self.plot.redraw()
        how = "stopped" if result.stopped else "finished"
        self.progress.close(f"Fine-tuning {how} after {result.steps} steps; saved {result.path}.")
        if result.best_dice is not None:
            self.dice.setText(f"Best validation Dice: {result.best_dice:.3f}")
        settings.set("model", str(result.path))
        tell(f"Fine-tuning {how}: {result.path} is now the Segment widget's model.")

    def job_name(self) -> str:
        return "Fine-tuning"
