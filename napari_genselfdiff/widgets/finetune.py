"""Fine-tune widget: paint a few strokes, click once, get a segmentation model.

The widget only gathers what the engine needs: the painted labels and the image pixels
under them (read at the pyramid level they were painted at), the class names and the base
model. Training runs in a separate process; the saved model becomes the Segment widget's.

It trains on the strokes of every image ticked under "Train on" (each read at the level it
was painted at). While it trains, the plot shows the loss, and every few hundred steps the
engine's prediction over the region in view appears as outlines in a "<image> preview" layer
under the strokes: paint where it errs, then Continue from the model just saved. The figures
it shows are the ones that cannot flatter the model: the painted share per class, and, for
complete masks only, the Dice on held-out tiles of the training images, named as such.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout

from genselfdiff.errors import UserError

from .. import _figures, _layers
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
    tell_warning,
)
from ._trainset import TrainingSetList

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
        self.image.currentTextChanged.connect(self._pick_annotation)
        self.level = QComboBox()
        self.level.setToolTip("The pyramid level to paint at: the model learns, and later segments, at this scale")
        self.trainset = TrainingSetList(napari_viewer, lambda: (self.image.layer(), self.labels.layer()))
        self.image.currentTextChanged.connect(self.trainset.refresh)
        self.labels.currentTextChanged.connect(self.trainset.refresh)
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
        # 0 = the engine's budget, which knows the start: strokes 1000 steps, a correction round
        # (Continue) 400, masks 50 epochs and at least 2500 steps (not imported: that loads torch).
        self.budget = BudgetEdit(0, default_text="default (strokes 1000 steps, Continue 400)")
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
        self.figures = QLabel("")  # the painted share per class (and, for masks, the held-out Dice)
        self.figures.setWordWrap(True)
        self.warning = QLabel("")  # an implausible preview, in one line
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #e8a33d")
        self.plot = TrainingPlot(napari_viewer.theme, score="Dice, held-out tiles")
        self._score = "val_dice"  # what the plot's second axis shows (the loss for strokes)

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Pixel size (µm/px)", self.pixel_size)
        new_row = QHBoxLayout()
        new_row.addWidget(self.level, 1)
        new_row.addWidget(self.new_button)
        form.addRow("Annotate at", new_row)
        form.addRow("Labels", self.labels)
        form.addRow("Train on", self.trainset)
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
        layout.addWidget(self.figures)
        layout.addWidget(self.warning)
        layout.addWidget(self.plot)
        layout.addStretch(1)
        settings.changed.connect(self._on_setting)
        self.result = None  # the last FinetuneResult
        self._steps_before = 0  # steps of the runs this one continues (the plot's x goes on)
        self._preview_on = None  # (image layer, level, annotation layer) of the running job
        self._snapshots = {}  # (image, annotation) names -> their strokes when the last round started
        self._fill_levels()
        self._pick_annotation()
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

    def _pick_annotation(self, *_):
        """Choosing an image chooses its annotation layer, when it has one."""
        image = self.image.layer()
        annotation = _layers.annotation_of(self.viewer, image) if image is not None else None
        if annotation is not None:
            self.labels.setCurrentText(annotation.name)

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
            layer, note = _layers.new_annotation_layer(self.viewer, image, max(self.level.currentIndex(), 0),
                                                       classes, default_colors(len(classes)))
        except ValueError as e:
            return tell_error(str(e))
        self.labels.setCurrentText(layer.name)
        self.mode.setCurrentText(SPARSE)
        self.trainset.tick(image.name)
        if note:
            tell_warning(note)
        tell(f"Paint with label 1 for {classes[0]}, 2 for {classes[1]}" + (", …" if len(classes) > 2 else "") + ".")

    def training_set(self) -> list:
        """The ticked images as dicts: ``image`` and ``labels`` (layers), ``rgb`` and ``strokes`` (the
        painted labels and the pixels under them, at the level painted at), ``level``, ``mpp`` (µm/px
        at that level, or None). ValueError says what is missing."""
        selected = self.image.layer()
        pairs = self.trainset.chosen()
        if not pairs:
            raise ValueError("Choose an image and a Labels layer painted over it (or click 'New annotation layer'), "
                             "and tick it under 'Train on'.")
        out = []
        for image, labels in pairs:
            rgb, lab, level = _layers.annotation_arrays(image, labels)
            if not lab.any():
                raise ValueError(f"{labels.name} has nothing painted over {image.name}; paint a few strokes first, "
                                 "or untick it under 'Train on'.")
            mpp = self.pixel_size.value(image.name) if image is selected else _layers.layer_pixel_size(image)
            d = _layers.downsamples(_layers.image_levels(image))[level]
            out.append({"image": image, "labels": labels, "rgb": rgb, "strokes": lab, "level": level,
                        "mpp": mpp * d if mpp else None})
        known = sorted(item["mpp"] for item in out if item["mpp"])
        if known and known[-1] > 1.1 * known[0]:
            raise ValueError(f"The images under 'Train on' are painted at different scales ({known[0]:.2f} and "
                             f"{known[-1]:.2f} µm/px); paint them at the same µm/px (see 'Annotate at').")
        return out

    def spec(self) -> dict:
        """What the engine needs, read from the layers; ValueError says what is missing."""
        items = self.training_set()
        first = next((it for it in items if it["image"] is self.image.layer()), items[0])
        out = self.out.text() or str(Path(settings.get("pretrain_folder") or Path.home()) /
                                     f"{first['image'].name}-segmenter.pt")
        self.out.setText(out)
        # One scale for all (training_set checked they agree): the model learns at it.
        mpp = first["mpp"] or next((it["mpp"] for it in items if it["mpp"]), None)
        every = self.preview_every.value()
        level = first["level"]
        return {
            "images": [it["rgb"] for it in items], "labels": [it["strokes"] for it in items], "out": out,
            "pairs": [(it["image"].name, it["labels"].name) for it in items], "classes": self.class_names(),
            "sparse": self.mode.currentText() == SPARSE, "pretrained": self.base.text() or None,
            "preset": self.preset.currentText(), "device": self.device.currentText(),
            "resolution": {"level": level, "mpp": mpp}, "pixel_size": mpp,
            "overrides": {"preview_every": every}, "preview": self.preview_region() if every else None,
            **self.budget.spec(),
        }

    def preview_region(self):
        """The pixels to show the model's prediction on: the part of the selected image in view (or,
        zoomed far out, around its strokes), read at the level painted at; None when there are none."""
        from genselfdiff.train.finetune import PREVIEW_MAX_SIDE

        image, labels = self.image.layer(), self.labels.layer()
        if image is None or labels is None:
            return None
        try:
            level = _layers.covered_window(image, labels)[0]
        except ValueError:
            return None
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
        if base is not None and (refusal := self._continue_refusal(spec)):
            return tell_error(refusal)
        settings.set("classes", ", ".join(spec["classes"]))
        settings.set("finetune_out", spec["out"])
        settings.set("finetune_preset", spec["preset"])
        settings.set("preview_every", self.preview_every.value())
        changed = self._changed_strokes(spec) if base is not None else 0
        self._snapshots = {pair: _figures.stroke_snapshot(lab) for pair, lab in zip(spec["pairs"], spec["labels"])}
        if base is None:
            self._steps_before = 0
            self.plot.clear()
        else:
            spec["pretrained"] = base
            self._steps_before += self.result.steps
        image, labels = self.image.layer(), self.labels.layer()
        self._preview_on = (image, _layers.covered_window(image, labels)[0], labels) if spec["preview"] else None
        # Held-out strokes lie along object cores: their Dice reads 1 within a few steps and says
        # nothing of the model, so strokes show the held-out loss; masks the Dice of held-out tiles.
        self._score = "val_loss" if spec["sparse"] else "val_dice"
        self.plot.set_score("loss, held-out strokes" if spec["sparse"] else "Dice, held-out tiles",
                            unit_range=not spec["sparse"])
        self.figures.setText(self._painted_line(spec) + (f"\n{changed} painted pixels changed class since the last "
                                                         "round." if changed else ""))
        self.warning.setText("")
        if changed:
            tell(f"{changed} painted pixels changed class since the last round (the newest stroke counts).")
        self.runner.start("finetune", spec)
        self.progress.start("Fine-tuning (starting)…" if base is None else f"Continuing from {Path(base).name}…")
        self._set_running(True)

    def _painted_line(self, spec) -> str:
        if not spec["sparse"]:
            return f"complete masks of {len(spec['labels'])} image(s)"
        n = len(spec["classes"]) + 1
        counts = sum(_figures.class_counts(lab, n) for lab in spec["labels"])
        return _figures.painted_line(counts, spec["classes"], len(spec["labels"]))

    def _changed_strokes(self, spec) -> int:
        return sum(_figures.changed_strokes(self._snapshots[pair], lab)
                   for pair, lab in zip(spec["pairs"], spec["labels"]) if pair in self._snapshots)

    def _continue_refusal(self, spec):
        """One sentence when the last model cannot go on with these annotations (other classes), else None."""
        model = list(self.result.classes or [])
        named = [("the Classes field", spec["classes"])]
        named += [(labels, _layers.annotation_classes(self.viewer.layers[labels])) for _, labels in spec["pairs"]]
        for where, classes in named:
            if classes and classes != model:
                return (f"The last model segments {', '.join(model)} but {where} names {', '.join(classes)}; nothing "
                        "was changed: use matching classes, or click Fine-tune to train a model for these classes.")
        return None

    def continue_training(self):
        """Train on from the model the last run saved, with the strokes painted since on every
        image ticked under 'Train on'."""
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
        counts = _figures.class_counts(payload["labels"], len(payload["classes"]))
        self.warning.setText(_figures.implausible(counts, payload["classes"], "the preview") or "")

    def _on_finished(self, result):
        self.result = result
        self._set_running(False)
        self.plot.redraw()
        how = "stopped" if result.stopped else "finished"
        self.progress.close(f"Fine-tuning {how} after {result.steps} steps; saved {result.path}.")
        if self._score == "val_dice" and result.best_dice is not None and result.best_dice == result.best_dice:
            # Tiles of the images trained on: optimistic for new images, and said so.
            self.figures.setText(self.figures.text().split("\n")[0] + f"\nDice on held-out tiles of the training "
                                 f"images: {result.best_dice:.3f} (not a measure on new images)")
        settings.set("model", str(result.path))
        tell(f"Fine-tuning {how}: {result.path} is now the Segment widget's model.")

    def job_name(self) -> str:
        return "Fine-tuning"
