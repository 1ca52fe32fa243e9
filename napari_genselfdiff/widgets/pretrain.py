"""Pretrain widget: teach a diffusion U-Net what tissue looks like from a folder of
unannotated slides, watch its loss fall, and look at images it draws."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout

from genselfdiff.errors import UserError

from ..settings import settings
from ._common import PRESETS, BudgetEdit, DeviceBox, JobWidget, PathEdit, PixelSizeEdit, TrainingPlot, tell, tell_error

SAMPLING_STEPS = 50  # a strided reverse process: a quick look, not the full 1000 steps
CPU_NOTE = ("On a CPU, pretraining at the budgets tried (10 minutes to about an hour) did not improve "
            "fine-tuning. It is meant for GPU-scale runs; without a GPU, skip it and fine-tune from scratch "
            "(leave the Fine-tune widget's Base model empty). See docs/pretraining.md.")


class PretrainWidget(JobWidget):
    stopping = "Stopping: saving a checkpoint…"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.folder = PathEdit("dir", placeholder="folder of slides or images")
        self.folder.setText(settings.get("pretrain_folder", ""))
        self.out = PathEdit("save", "Checkpoints (*.pt)", "where to save the model (.pt)")
        self.out.setText(settings.get("pretrain_out", ""))
        self.preset = QComboBox()
        self.preset.addItems(PRESETS)
        self.preset.setCurrentText(settings.get("pretrain_preset", "auto"))
        self.preset.setToolTip("auto: paper on a CUDA GPU, the CPU's best by measurement otherwise; tiny: quick try "
                               "on a CPU; small: a laptop GPU; paper: the published model")
        self.budget = BudgetEdit(2000)
        self.budget.setToolTip("How long to pretrain, in steps or minutes. " + CPU_NOTE)
        self.device = DeviceBox()
        self.pixel_size = PixelSizeEdit("as the files state (PNG/JPEG: unknown)")
        self.resume = QCheckBox("continue from the saved model")
        self.start_button, self.stop_button = QPushButton("Start"), QPushButton("Stop")
        self.start_button.setToolTip(CPU_NOTE)
        self.note = QLabel(CPU_NOTE)
        self.note.setWordWrap(True)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self.plot = TrainingPlot(napari_viewer.theme)
        self.n_samples = QSpinBox()
        self.n_samples.setRange(1, 64)
        self.n_samples.setValue(4)
        self.sample_button = QPushButton("Draw images from the model")
        self.sample_button.clicked.connect(self.draw_samples)

        form = QFormLayout()
        form.addRow("Slides", self.folder)
        form.addRow("Save as", self.out)
        form.addRow("Preset", self.preset)
        form.addRow("Train for", self.budget)
        form.addRow("Pixel size (µm/px)", self.pixel_size)
        form.addRow("Device", self.device)
        form.addRow("", self.resume)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        samples = QHBoxLayout()
        samples.addWidget(self.sample_button, 1)
        samples.addWidget(self.n_samples)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.note)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addLayout(samples)
        layout.addStretch(1)
        self.result = None  # the last PretrainResult
        self._job, self._samples = None, None

    def spec(self) -> dict:
        folder, out = self.folder.text(), self.out.text()
        if not folder:
            raise ValueError("Choose the folder of slides to pretrain on.")
        if not out:
            out = str(Path(folder) / "pretrained.pt")
            self.out.setText(out)
        return {"sources": [folder], "out": out, "preset": self.preset.currentText(),
                "device": self.device.currentText(), "resume": self.resume.isChecked(),
                "pixel_size": self.pixel_size.value(f"the images in {folder}"), **self.budget.spec()}

    def start(self):
        try:
            spec = self.spec()
        except (ValueError, UserError) as e:
            return tell_error(str(e))
        settings.set("pretrain_folder", spec["sources"][0])
        settings.set("pretrain_out", spec["out"])
        settings.set("pretrain_preset", spec["preset"])
        self.plot.clear()
        self._job = "pretrain"
        self.runner.start("pretrain", spec)
        self.progress.start("Pretraining (starting)…")
        self._set_running(True)

    def draw_samples(self):
        model = self.out.text()
        if not model or not Path(model).exists():
            return tell_error("Pretrain a model first (or choose a saved one under 'Save as').")
        self._job = "sample"
        self._samples = None
        self.runner.start("sample", {"model": model, "n": self.n_samples.value(), "device": self.device.currentText(),
                                     "timesteps": SAMPLING_STEPS})
        self.progress.start("Drawing images from the model…")
        self._set_running(True)

    def _set_running(self, running: bool):
        self.start_button.setEnabled(not running)
        self.sample_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _on_progress(self, p):
        if self._job == "sample":
            if p.payload is not None:  # the model's current guess, sharpening as the noise goes
                self._show_samples(p.payload)
            return self.progress.update(p, f"Drawing images: step {p.done} / {p.total}")
        loss = p.metrics.get("loss")
        text = f"{p.stage}: step {p.done}" + (f" / {p.total}" if p.total else "")
        if loss is not None:
            self.plot.add(p.done, float(loss))
            text += f" · loss {float(loss):.4f}"
        self.progress.update(p, text)

    def _on_finished(self, result):
        self._set_running(False)
        if self._job == "sample":
            self.progress.close(f"Drew {self.n_samples.value()} images from {Path(self.out.text()).name}.")
            self._show_samples(result)
            return
        self.result = result
        self.plot.redraw()
        how = "stopped" if result.stopped else "finished"
        self.progress.close(f"Pretraining {how} after {result.steps} steps; saved {result.path}.")
        settings.set("pretrained", str(result.path))
        tell(f"Pretraining {how}: {result.path}")

    def _show_samples(self, images):
        if self._samples is None or self._samples not in self.viewer.layers:
            self._samples = self.viewer.add_image(images, rgb=True, name=f"drawn by {Path(self.out.text()).stem}")
        else:
            self._samples.data = images

    def job_name(self) -> str:
        return "Pretraining" if self._job == "pretrain" else "Drawing images"
