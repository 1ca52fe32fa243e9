"""Small Qt pieces the three widgets share: path fields, layer pickers, device and budget
choosers, the training plot, the base of the widgets that run training jobs, and how
results and errors are told to the user."""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from genselfdiff.nn.config import PRESET_CHOICES  # no torch: napari still starts fast

from ..settings import settings
from ..workers import JobRunner, ProgressView

PRESETS = list(PRESET_CHOICES)  # "auto" first: the engine picks by device (config.resolve_preset)


class PathEdit(QWidget):
    """A path field with a browse button; ``mode`` is 'open', 'save' or 'dir'."""

    changed = Signal(str)

    def __init__(self, mode: str = "open", filter: str = "", placeholder: str = "", parent=None):
        super().__init__(parent)
        self.mode, self.filter = mode, filter
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.edit.textChanged.connect(self.changed)
        button = QPushButton("…")
        button.setFixedWidth(30)
        button.setToolTip("Browse")
        button.clicked.connect(self._browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit)
        row.addWidget(button)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text) -> None:
        self.edit.setText(str(text or ""))

    def _browse(self):
        if self.mode == "dir":
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", self.text())
        elif self.mode == "save":
            path, _ = QFileDialog.getSaveFileName(self, "Save as", self.text(), self.filter)
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Open", self.text(), self.filter)
        if path:
            self.setText(path)


class DeviceBox(QComboBox):
    """auto / cuda / mps / cpu. The list needs torch, so it is filled when first opened:
    docking a widget must not import torch."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._filled = False
        current = settings.get("device", "auto")
        self.addItems(["auto", "cpu"] if current in ("auto", "cpu") else ["auto", current, "cpu"])
        self.setCurrentText(current)
        self.currentTextChanged.connect(lambda name: settings.set("device", name))

    def showPopup(self):
        if not self._filled:
            from genselfdiff.nn.model import available_devices

            current = self.currentText()
            self.blockSignals(True)
            self.clear()
            self.addItems(available_devices())
            self.setCurrentText(current if current in available_devices() else "auto")
            self.blockSignals(False)
            self._filled = True
        super().showPopup()


class BudgetEdit(QWidget):
    """How long to train: a number of steps or of minutes."""

    def __init__(self, steps: int, parent=None, default_text: str = None):
        """``default_text``: offer 0, shown as that text, meaning "the engine's budget" (and start there)."""
        super().__init__(parent)
        self.amount = QSpinBox()
        self.amount.setRange(0 if default_text else 1, 10_000_000)
        if default_text:
            self.amount.setSpecialValueText(default_text)
        self.amount.setValue(steps)
        self.unit = QComboBox()
        self.unit.addItems(["steps", "minutes"])
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.amount, 1)
        row.addWidget(self.unit)

    def spec(self) -> dict:
        return {"budget_unit": self.unit.currentText(), "budget": self.amount.value()}


class LayerBox(QComboBox):
    """The viewer's layers of one kind ('image' or 'labels'), kept in sync with the viewer."""

    def __init__(self, viewer, kind: str, parent=None):
        super().__init__(parent)
        self.viewer, self.kind = viewer, kind
        for event in ("inserted", "removed", "moved", "changed"):
            getattr(viewer.layers.events, event).connect(self.refresh)
        self.refresh()

    def layers(self) -> list:
        return [layer for layer in self.viewer.layers if type(layer).__name__.lower() == self.kind]

    def refresh(self, *_):
        current = self.currentText()
        names = [layer.name for layer in self.layers()]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None


class PixelSizeEdit(QLineEdit):
    """The level-0 µm/px of the input images; empty means unknown (or: as the files state)."""

    def __init__(self, placeholder: str = "unknown", parent=None):
        super().__init__(parent)
        self.setPlaceholderText(placeholder)
        self.setToolTip("µm per pixel at full resolution, e.g. 0.25 for 40x, 0.5 for 20x; results depend on it")

    def show_layer(self, layer) -> None:
        """Prefill from an image layer's physical scale (empty when it has none)."""
        from .._layers import layer_pixel_size

        mpp = layer_pixel_size(layer) if layer is not None else None
        self.setText(f"{mpp:g}" if mpp else "")

    def value(self, where: str):
        """The µm/px as a float, or None; a bad entry raises the engine's UserError naming ``where``."""
        from genselfdiff.io.pixelsize import check_pixel_size

        return check_pixel_size(self.text().strip() or None, where)


class TrainingPlot(QWidget):
    """The training loss as it comes in (faint) and smoothed, and, given ``score``, a
    validation score in [0, 1] on a second axis (matplotlib, redrawn every few points)."""

    def __init__(self, theme: str = "dark", score: str = "", parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from napari.utils.theme import get_theme

        colors = get_theme(theme)
        text, line, background = colors.text.as_hex(), colors.highlight.as_hex(), colors.background.as_hex()
        self.figure = Figure(figsize=(3, 1.8), layout="constrained", facecolor=background)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        self.axes = self.figure.add_subplot(facecolor=background)
        self.steps, self.losses = [], []
        self.score_steps, self.scores = [], []
        (self.line,) = self.axes.plot([], [], lw=0.8, color=line, alpha=0.35)
        (self.trend,) = self.axes.plot([], [], lw=1.6, color=line)  # the noisy loss, smoothed
        self.axes.set_xlabel("step", fontsize=8, color=text)
        self.axes.set_ylabel("loss", fontsize=8, color=text)
        self.score_axes = self.score_line = None
        if score:
            warm = colors.warning.as_hex()
            self.score_axes = self.axes.twinx()
            (self.score_line,) = self.score_axes.plot([], [], lw=1.2, color=warm, marker="o", ms=3)
            self.score_axes.set_ylim(0, 1)
            self.score_axes.set_ylabel(score, fontsize=8, color=warm)
        for axes in (self.axes, self.score_axes):
            if axes is not None:
                axes.tick_params(labelsize=7, colors=text)
                for spine in axes.spines.values():
                    spine.set_color(text)
        QVBoxLayout(self).addWidget(self.canvas)
        self.layout().setContentsMargins(0, 0, 0, 0)
        self.setVisible(False)  # shown from the first point on

    def clear(self):
        self.steps, self.losses = [], []
        self.score_steps, self.scores = [], []
        self.redraw()

    def set_score(self, name: str, unit_range: bool = True):
        """What the second axis shows: a score in [0, 1] (Dice), or one scaled to its values (a loss)."""
        if self.score_axes is None:
            return
        self.score_axes.set_ylabel(name, fontsize=8, color=self.score_line.get_color())
        self.score_axes.set_autoscaley_on(not unit_range)
        if unit_range:
            self.score_axes.set_ylim(0, 1)

    def add(self, step: int, loss: float):
        self.setVisible(True)
        self.steps.append(step)
        self.losses.append(loss)
        if len(self.steps) % 5 == 1:
            self.redraw()

    def add_score(self, step: int, score: float):
        """A validation score (few points: each is drawn at once)."""
        self.setVisible(True)
        self.score_steps.append(step)
        self.scores.append(score)
        self.redraw()

    def redraw(self):
        self.line.set_data(self.steps, self.losses)
        trend, value = [], None
        for loss in self.losses:  # exponential moving average
            value = loss if value is None else 0.9 * value + 0.1 * loss
            trend.append(value)
        self.trend.set_data(self.steps, trend)
        self.axes.relim()
        self.axes.autoscale_view()
        if self.score_line is not None:
            self.score_line.set_data(self.score_steps, self.scores)
            if self.score_axes.get_autoscaley_on():
                self.score_axes.relim()
                self.score_axes.autoscale_view(scalex=False)
        self.canvas.draw_idle()


def progress_row():
    """A progress bar and the line of text under it."""
    bar = QProgressBar()
    bar.setVisible(False)  # shown while a job runs
    label = QLabel("")
    label.setWordWrap(True)
    return bar, label


def tell_error(text: str, is_user: bool = True, what: str = "The job") -> None:
    """A napari notification in plain words; bugs say so (their traceback is in the log)."""
    from napari.utils.notifications import show_error

    show_error(text if is_user else f"{what} failed because of a bug: {text}")


def tell_warning(text: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(text)


def tell(text: str) -> None:
    from napari.utils.notifications import show_info

    show_info(text)


class JobWidget(QWidget):
    """What the Pretrain and Fine-tune widgets share: one engine job at a time in a child
    process (``JobRunner``), the progress row under it, Stop, and a clean shutdown on close.
    Subclasses lay out ``self.bar`` and ``self.status`` and define ``_on_progress``,
    ``_on_finished``, ``_set_running`` and ``job_name``."""

    stopping = "Stopping…"  # shown once Stop is clicked, until the job has saved its work

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.bar, self.status = progress_row()
        self.progress = ProgressView(self.bar, self.status)
        self.runner = JobRunner(self)
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        self.runner.noted.connect(tell_warning)

    def job_name(self) -> str:
        """How a failure names the job ("Fine-tuning failed because …")."""
        raise NotImplementedError

    def stop(self):
        self.runner.stop()
        self.status.setText(self.stopping)

    def _on_failed(self, text: str, is_user: bool):
        self._set_running(False)
        self.progress.close("")
        tell_error(text, is_user, self.job_name())

    def closeEvent(self, event):
        self.runner.shutdown()
        super().closeEvent(event)
