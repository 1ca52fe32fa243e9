"""Inference: whole slides segmented lazily, tile by tile, on one machine or a dask cluster.

``plan`` decides the level, tiles and output chunks; ``tiling`` is their arithmetic; ``pipeline``
reads, predicts and writes in three stages; ``segment`` is the public API; ``dask`` runs the
same chunk tasks on dask.distributed workers.

May import: ``io``, ``nn``, ``objects`` and the top-level modules.
"""
