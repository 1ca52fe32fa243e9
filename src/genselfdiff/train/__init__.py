"""Training: diffusion pretraining and segmentation fine-tuning, and what they share.

``run`` is the scaffold both jobs use (budget, loop, resume state); ``pretrain`` and
``finetune`` are the two jobs; ``patches`` and ``annotations`` draw their training data;
``losses``, ``augment``, ``stain_prior`` and ``recipe`` shape what is learned; ``ddp`` is
torch's DistributedDataParallel under ``torchrun``.

May import: ``io``, ``nn``, ``objects``, ``infer`` (the fine-tune preview segments as a
slide would be) and the top-level modules.
"""
