"""`genselfdiff finetune --help` names the loss and the budget that FinetuneConfig really uses.

The expected words are derived from the configuration's defaults, so the test fails when either
the help text or a default changes without the other.
"""

import argparse
import importlib
import sys

from genselfdiff import FinetuneConfig
from genselfdiff.app.cli import build_parser

# How the help text names each loss (the keys are genselfdiff.train.losses.LOSSES).
LOSS_WORDS = {
    "dice_ce": "soft Dice + cross-entropy",
    "paper": "the paper's structural-similarity + focal loss",
    "official": "the official code's structural-similarity + focal loss",
    "ce": "cross-entropy",
    "dice": "soft Dice",
}


def _finetune_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["finetune"]


def _help_of(parser, dest: str) -> str:
    return next(a.help for a in parser._actions if a.dest == dest)


def _defaults():
    """The configuration a run gets with nothing chosen, and the budget constants it is made of."""
    cfg = FinetuneConfig.from_preset("auto")  # the default recipe's values applied, as in a run
    return cfg, _constant("DEFAULT_EPOCHS"), _constant("SPARSE_STEPS")


def _constant(name: str):
    """A module constant of fine-tuning, wherever FinetuneConfig and the run's budget live."""
    for module in (sys.modules[FinetuneConfig.__module__], importlib.import_module("genselfdiff.train.finetune")):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"{name} not found beside FinetuneConfig or in genselfdiff.train.finetune")


def test_help_names_the_default_loss():
    cfg, _, _ = _defaults()
    parser = _finetune_parser()
    words = LOSS_WORDS[cfg.loss]
    assert f"Loss by default: {words} (" in parser.description
    assert f"{cfg.loss} = {words} (default)" in _help_of(parser, "loss")
    for name, other in LOSS_WORDS.items():  # no other loss is called the default
        if name != cfg.loss:
            assert f"Loss by default: {other} (" not in parser.description
            assert f"{name} = {other} (default)" not in _help_of(parser, "loss")


def test_help_names_the_default_budget():
    cfg, epochs, sparse_steps = _defaults()
    parser = _finetune_parser()
    masks = f"{epochs} epochs and at least {cfg.min_steps} steps"
    strokes = f"strokes (--sparse): {sparse_steps} steps"
    for text in (parser.description, _help_of(parser, "epochs")):
        assert masks in text and strokes in text, text
    assert f"default {cfg.patience}, never before step {cfg.min_steps}" in _help_of(parser, "patience")


def test_help_names_the_correction_rounds_budget_and_anchor():
    parser = _finetune_parser()
    steps, anchor = _constant("SPARSE_CONTINUE_STEPS"), _constant("SPARSE_ANCHOR")
    assert "A correction round" in parser.description and f"): {steps} steps, keeping" in parser.description
    assert f"{steps} in a correction round" in _help_of(parser, "epochs")
    assert f"(default {anchor:g} when --sparse strokes continue" in _help_of(parser, "anchor")
