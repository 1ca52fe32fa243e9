"""Files in and out: slides, label images, OME-Zarr, QuPath GeoJSON, checkpoints, atomic writes.

Everything that touches the disk in a format a user knows lives here, together with the pixel
size that a file states (or that the user gives). Nothing here trains or runs a network.

May import: the top-level ``errors``, ``progress`` and ``_version`` modules only.
"""
