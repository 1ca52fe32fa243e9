"""napari-genselfdiff: the napari face of the genselfdiff engine.

Readers, writers, sample data and three dock widgets (Pretrain, Fine-tune, Segment),
declared in ``napari.yaml``. Nothing heavy is imported here, so napari starts fast.
"""
