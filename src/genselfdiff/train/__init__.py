"""Training: diffusion pretraining and segmentation fine-tuning, and what they share.

``run`` is the one training run both jobs are (``TrainingRun``: the loop with hooks, the
history, the kept network, both files; budget and resume state); ``pretrain`` and
``finetune`` (with ``finetune_run``) are the two jobs, each with its step as an object
(``DiffusionStep``, ``SegmentationStep``); ``config`` holds both configurations; ``patches``
and ``annotations`` draw their training data; ``losses``, ``augment``, ``priors`` and
``recipe`` (the default and the official recipe, one object each) shape what is learned;
``ddp`` is torch's DistributedDataParallel under ``torchrun``.

May import: ``io``, ``nn``, ``objects``, ``infer`` (the fine-tune preview segments as a
slide would be) and the top-level modules.
"""
