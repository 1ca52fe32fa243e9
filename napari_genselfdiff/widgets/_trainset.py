"""The Fine-tune widget's training set: a checkable list of (image, annotation layer) pairs.

Every RGB image with an annotation layer (as :func:`napari_genselfdiff._layers.annotation_of`
pairs them, or the Labels layer chosen for the selected image) is a row; the ticked rows are
what Fine-tune and Continue train on. A row is ticked when it first appears for the selected
image or when its annotation layer is made; the user's ticks are kept while the layers live.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from .. import _layers


class TrainingSetList(QListWidget):
    def __init__(self, viewer, selected, parent=None):
        """``selected()`` gives the widget's ``(image layer, Labels layer)`` choice (either may be None)."""
        super().__init__(parent)
        self.viewer, self.selected = viewer, selected
        self._ticked = {}  # image name -> ticked
        self.setToolTip("The images whose strokes Fine-tune and Continue train on, each with its annotation layer")
        self.itemChanged.connect(self._remember)
        for event in ("inserted", "removed", "moved", "changed"):
            getattr(viewer.layers.events, event).connect(self.refresh)
        self.refresh()

    def pairs(self) -> list:
        """Every ``(image layer, annotation layer)`` pair in the viewer, in layer order."""
        image, labels = self.selected()
        out = []
        for layer in self.viewer.layers:
            if type(layer).__name__ != "Image" or not layer.rgb:
                continue
            annotation = labels if layer is image and labels is not None else _layers.annotation_of(self.viewer, layer)
            if annotation is not None:
                out.append((layer, annotation))
        return out

    def chosen(self) -> list:
        """The ticked pairs."""
        return [(image, labels) for image, labels in self.pairs() if self._ticked.get(image.name)]

    def tick(self, image_name: str, on: bool = True) -> None:
        self._ticked[image_name] = on
        self.refresh()

    def refresh(self, *_):
        image, _ = self.selected()
        pairs = self.pairs()
        names = {im.name for im, _ in pairs}
        self._ticked = {k: v for k, v in self._ticked.items() if k in names}
        if image is not None and image.name in names:
            self._ticked.setdefault(image.name, True)  # by default the selected image
        self.blockSignals(True)
        self.clear()
        for im, labels in pairs:
            item = QListWidgetItem(f"{im.name}  ({labels.name})")
            item.setData(Qt.UserRole, im.name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if self._ticked.get(im.name, False) else Qt.Unchecked)
            self.addItem(item)
        self.blockSignals(False)
        self.setMaximumHeight(24 + 20 * min(max(len(pairs), 1), 5))

    def _remember(self, item):
        self._ticked[item.data(Qt.UserRole)] = item.checkState() == Qt.Checked
