"""Evaluation: segmentations scored against ground truth (Dice, IoU, AJI, PQ, counts).

May import: ``io``, ``objects`` and the top-level modules.
"""
