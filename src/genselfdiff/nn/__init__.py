"""The network: the U-Net and its presets, the diffusion schedule, a trained model ready for use.

:class:`~genselfdiff.nn.model.Model` (from :func:`~genselfdiff.nn.model.load_model`) carries
what every caller needs to run a network the same way: the input scaling, the classes, the
resolution it was trained at, and the device and bf16 rules.

May import: ``io`` and the top-level ``errors``, ``progress``, ``_version``.
"""
