"""Fine-tuning a (pretrained) diffusion U-Net into a segmentation network.

As in GenSelfDiff-HIS the whole pretrained U-Net is kept and trained end to end; only
the 1x1 output head is new (one logit per class) and the timestep is fixed at 0
(:func:`genselfdiff.nn.unet.to_segmentation`). Loss by default: soft Dice + cross-entropy, plus a
colour-affinity term and, for strokes of nuclei, a haematoxylin prior on the unlabelled pixels
(:mod:`genselfdiff.train.priors`; the paper's structural similarity + focal is ``loss="paper"``;
:mod:`genselfdiff.train.losses`); Adam, betas (0.5, 0.999), the learning rate by start
(:data:`LEARNING_RATES`), batch 8; patches drawn around annotated pixels
(:mod:`genselfdiff.train.annotations`) and augmented consistently, stain included
(:mod:`genselfdiff.train.augment`). Pixels are scaled to [-1, 1] exactly as in pretraining
(:func:`genselfdiff.nn.model.to_input`), so the pretrained filters see what they learnt on.
``recipe="official"`` follows the official code instead (:mod:`genselfdiff.train.recipe`).
This module checks the inputs and sets the run up (its configuration is
:class:`~genselfdiff.train.config.FinetuneConfig`); :mod:`genselfdiff.train.finetune_run` trains.

An epoch is a fixed number of steps (by default about one pass over the annotated
tiles); after each one the held-out tiles are scored. For masks the best network is kept (by
the mean Dice of the object classes) and training stops early after ``patience`` epochs
without improvement; for strokes, whose few held-out pixels cannot rank networks, the latest
network is kept and the run uses its whole budget; no run stops early before ``min_steps``.
With no budget given, masks train for ``DEFAULT_EPOCHS`` and at least ``min_steps``; strokes
for ``SPARSE_STEPS``, since longer runs on strokes scored no higher (docs/finetuning.md). Strokes that
continue a segmentation model of the same classes (a correction round) train ``SPARSE_CONTINUE_STEPS``
and keep the previous model's confident predictions on unpainted pixels as weak targets
(``anchor``, :mod:`genselfdiff.train.priors`), so a few new strokes correct it where they are
without overturning what it had right elsewhere.
As in pretraining, ``out`` holds the kept network (rewritten atomically when validation
improves, and at the end with the full history) and ``<out>.last.pt`` the state of the last step (weights, Adam, step, RNG, early-stopping
counters) that ``resume=True`` continues from.

Given a ``preview`` region, the current network's prediction over it is reported every
``preview_every`` steps (``Progress(stage="preview")``), so a person painting strokes sees
where the model errs while it learns. It runs in eval mode on a forked RNG and changes
nothing about the training itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..io.labels import default_colors
from ..io.pixelsize import Resolution, tell, unknown_note, working_resolution
from ..io.slides import open_labelled_image
from ..nn.config import NetConfig, with_preset
from ..nn.model import Model, pick_device
from ..nn.stain import METHOD as STAIN_METHOD
from ..nn.unet import SegmentationNet
from ..progress import Progress, resolve
from . import annotations, priors
from .annotations import (
    PatchSampler,
    attach_instances,
    check_classes,
    labelled_image,
    scan,
    split_tiles,
    validation_set,
)
from .config import FinetuneConfig
from .finetune_run import FinetuneResult, FinetuneRun, SegmentationStep
from .losses import LOSSES
from .recipe import Recipe, get_recipe
from .run import Budget

LR_SCHEDULES = ("constant", "cosine")
DEFAULT_EPOCHS = 50  # when no budget is given (at least min_steps); early stopping may end sooner
# Strokes with no budget given: a fixed number of steps. On MoNuSeg 2500 steps scored no higher
# than 1000 (Dice 0.766 against 0.769 over 3 seeds, constant rate) in 2.5x the time (docs/finetuning.md).
SPARSE_STEPS = 1000
# Learning rates of the default recipe, chosen on MoNuSeg with the tiny network (docs/finetuning.md):
# a pretrained (or segmentation) start loses what it learnt at 1e-3, a random one learns fastest
# there. The small network from scratch diverged at 1e-3 (loss 0.3 to 5.6 near step 900) and
# trains at 3e-4. The paper network keeps the published 1e-4.
LEARNING_RATES = {"paper": (1e-4, 1e-4), "small": (3e-4, 3e-4)}  # preset: (from a trained start, from scratch)
OTHER_LEARNING_RATES = (3e-4, 1e-3)
SPARSE_AFFINITY = 10.0  # weight of the colour-affinity loss for strokes (losses.affinity_loss)
SPARSE_PRIOR = 0.5  # weight of the haematoxylin prior for strokes that agree with it (priors)
# A correction round: the weight of the previous model's confident predictions on unpainted pixels,
# and its steps (docs/research/2026-12-08-corrections.md).
SPARSE_ANCHOR = 1.0
SPARSE_CONTINUE_STEPS = 400
# Strokes keep their latest network, so the rate decays to 0 and the run ends settled rather than
# wherever a constant rate left it: over 3 seeds the seed spread fell from 0.008 to 0.001 (docs/finetuning.md).
SPARSE_LR_SCHEDULE = "cosine"
PREVIEW_MAX_SIDE = 1024  # pixels at the training resolution: a quick prediction, a small message


@dataclass
class Preview:
    """A region to predict on while training: ``image`` uint8 (H, W, 3) at the training
    resolution (at most ``PREVIEW_MAX_SIDE`` a side); ``origin`` says where it lies and is
    handed back untouched with each prediction."""

    image: np.ndarray
    origin: tuple = (0, 0)


@dataclass
class _Start:
    """Where the network's weights come from."""

    net_cfg: NetConfig
    weights: Optional[dict] = None
    kind: Optional[str] = None  # "pretrained", "segmentation" or None (random init)
    classes: Optional[list] = None
    colors: Optional[list] = None
    provenance: Optional[dict] = None
    stain: Optional[str] = None  # the stain normalization a segmentation model's input gets (nn.stain)


def finetune(images: Sequence, labels: Sequence, out, config: FinetuneConfig, *, pretrained=None,
             device="auto", progress=None, should_stop=None, resume: bool = False, pixel_size=None,
             override_pixel_size: bool = False, preview: Optional[Preview] = None,
             instances: Optional[Sequence] = None) -> FinetuneResult:
    """Train a segmentation network from ``images`` and their ``labels``; see the module doc.

    ``images``: paths, :class:`~genselfdiff.io.slides.Slide` objects or uint8 (H, W, 3)
    arrays (numpy or dask); ``labels``: mask paths or integer (H, W) arrays of the same
    size as their image at ``config.resolution``. ``pretrained``: a pretrained (or
    segmentation, to continue) checkpoint; None trains from random initialisation.
    ``resume``: continue the run whose state is at ``<out>.last.pt``. ``pixel_size``: the level-0
    µm/px of the images (see :func:`genselfdiff.io.slides.open_slide`); without ``config.resolution``
    they are read at ``DEFAULT_MPP`` when their size is known (masks of the full image follow).
    ``preview``: a :class:`Preview` region; every ``config.preview_every`` steps (and at the
    end, unless stopped) ``progress`` receives ``Progress("preview", step, payload={"labels":
    uint8 class ids, "origin", "step", "classes", "colors"})``.
    """
    progress, should_stop = resolve(progress, should_stop)
    cfg = replace(config)
    out = Path(out)
    images, labels = list(images), list(labels)
    if not images:
        raise UserError("No images to fine-tune on.")
    if len(images) != len(labels):
        raise UserError(f"Got {len(images)} images but {len(labels)} label images; give one mask per image.")
    if instances is not None and (len(instances) != len(images) or cfg.sparse):
        raise UserError("Instance ids need one id image per image, with dense masks (not strokes)."
                        if cfg.sparse else f"Got {len(images)} images but {len(instances)} images of instance ids.")
    if cfg.loss not in LOSSES:
        raise UserError(f"Unknown loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}.")
    recipe = get_recipe(cfg.recipe)
    if cfg.lr_schedule is None:
        cfg.lr_schedule = SPARSE_LR_SCHEDULE if cfg.sparse else "constant"  # the official recipe sets its own
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"Unknown learning-rate schedule {cfg.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    if preview is not None:
        _check_preview(preview)
    start = _load_start(pretrained, recipe) if pretrained is not None else None

    dev = pick_device(device) if not isinstance(device, torch.device) else device
    cfg = with_preset(cfg, dev, start.provenance["preset"] if start else None)  # the base model's preset wins
    start = start or _Start(cfg.net)
    if cfg.lr is None:
        trained, scratch = LEARNING_RATES.get(cfg.preset, OTHER_LEARNING_RATES)
        cfg.lr = trained if start.kind else scratch
    if cfg.affinity is None:
        cfg.affinity = SPARSE_AFFINITY if cfg.sparse else 0.0
    if start.kind:  # the network is the checkpoint's, whatever the preset says
        cfg.net = start.net_cfg
    if start.kind == "segmentation":  # a model goes on seeing the pixels it learnt on
        cfg.stain = bool(start.stain)
    mult = cfg.net.downsampling
    if cfg.patch % mult or cfg.patch < 2 * mult:
        raise UserError(f"Patch size {cfg.patch} must be a multiple of {mult} (and at least {2 * mult}) for this network.")

    progress(Progress("finetune: reading annotations", 0, len(images)))
    items, notes = [], []
    resolution = working_resolution(cfg.resolution)
    for i, (im, lab) in enumerate(zip(images, labels)):
        opened = open_labelled_image(im, lab, resolution, pixel_size=pixel_size, override_pixel_size=override_pixel_size,
                                     index=i, sparse=cfg.sparse)
        notes += opened.notes
        items.append(labelled_image(opened))
        if instances is not None:  # the geometry head learns from them (nn.geometry)
            attach_instances(items[-1], instances[i], lab, i)
        scan(items[-1], sparse=cfg.sparse, tile=cfg.patch, seed=cfg.seed + i)
        progress(Progress("finetune: reading annotations", i + 1, len(images)))
    if cfg.stain:
        annotations.normalize_stains(items)
    unknown = [it.image_source or it.name for it in items if it.mpp is None]
    for note in notes + ([unknown_note(unknown)] if unknown else []):
        tell(note)
    names = check_classes(items, cfg, start)
    n_classes = len(names)
    cfg.class_names, cfg.classes = names, n_classes
    colors = [list(c) for c in (cfg.colors or (start.colors if start.classes == names else None) or default_colors(n_classes))]
    if len(colors) < n_classes:
        raise UserError(f"{len(colors)} colours given for {n_classes} classes.")

    with torch.random.fork_rng(devices=[]):  # the same initial weights for a seed; the caller's RNG untouched
        torch.manual_seed(cfg.seed)
        net = recipe.start_net(start, n_classes, cfg.net, geometry=instances is not None).to(dev)

    split = split_tiles(items, cfg.val_fraction, seed=cfg.seed)
    balance = cfg.balance if cfg.balance is not None else (1.0 if cfg.sparse else 0.0)
    margin = max(mult, cfg.patch // 4 // mult * mult)
    anchors = _anchors(items, cfg, start, net, dev, margin, progress)
    thresholds = _stain_prior(items, cfg)
    sampler = PatchSampler(items, cfg.patch, cfg.patch, cfg.sparse, balance, prior=thresholds, anchors=anchors)
    val = validation_set(items, cfg.patch, margin, cfg.sparse, on_train=not split, max_tiles=cfg.val_max_tiles, seed=cfg.seed)
    budget = _budget(cfg, cfg.steps_per_epoch or _default_steps_per_epoch(items, cfg),
                     continuing=start.kind == "segmentation")
    meta = _checkpoint_meta(cfg, net, names, colors, start, items, val, instances)
    run = FinetuneRun(cfg=cfg, step=SegmentationStep.from_config(cfg, net, dev), sampler=sampler, budget=budget,
                      out=out, names=names, colors=colors, meta=meta, val=val, preview=preview)
    return run.train(progress, should_stop, resume=resume)


# --- setting up ----------------------------------------------------------------------------

def _check_preview(preview: Preview) -> None:
    image = np.asarray(preview.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"The preview region must be a uint8 (H, W, 3) image, not {image.dtype} {image.shape}.")
    if max(image.shape[:2]) > PREVIEW_MAX_SIDE:
        raise UserError(f"The preview region is {image.shape[0]}×{image.shape[1]} pixels; "
                        f"choose one of at most {PREVIEW_MAX_SIDE}×{PREVIEW_MAX_SIDE}.")


def _load_start(pretrained, recipe: Recipe) -> _Start:
    path = Path(pretrained)
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind")
    if kind not in ("pretrained", "segmentation") or "net" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is neither a pretrained nor a segmentation genselfdiff model.")
    try:
        net_cfg = NetConfig.from_dict(ckpt["net"])
    except (TypeError, ValueError):
        raise UserError(f"{path} describes a network this version cannot build.") from None
    if net_cfg.in_channels != 3:
        raise UserError(f"{path} was trained on {net_cfg.in_channels}-channel images; fine-tuning needs an RGB model.")
    classes = list(ckpt.get("classes") or []) if kind == "segmentation" else None
    # A pretrained model's EMA weights, when it has them, are its better weights (as for sampling).
    weights = (ckpt.get("ema_state_dict") if kind == "pretrained" else None) or ckpt["state_dict"]
    try:  # build once to fail early, naming the file, if the weights do not fit
        recipe.start_net(_Start(net_cfg, weights, kind, classes), len(classes) if classes else 2, net_cfg)
    except (RuntimeError, KeyError, ValueError, TypeError):
        raise UserError(f"{path} holds weights of another architecture than the genselfdiff U-Net it describes; "
                        "use a model pretrained with this version of genselfdiff.") from None
    provenance = {"path": str(path.resolve()), "kind": kind, "step": ckpt.get("step"),
                  "preset": (ckpt.get("config") or {}).get("preset"), "data": ckpt.get("data"),
                  "package_version": ckpt.get("package_version"),
                  "pretrained_from": ckpt.get("pretrained_from") if kind == "segmentation" else None}
    return _Start(net_cfg, weights, kind, classes, ckpt.get("colors"), provenance, ckpt.get("stain") or None)


def _stain_prior(items: list, cfg: FinetuneConfig) -> Optional[list]:
    """Per-image haematoxylin thresholds when the prior applies; ``cfg.prior`` becomes the
    weight used (0 when the strokes disagree with the stain), which the checkpoint records."""
    wanted = SPARSE_PRIOR if cfg.prior is None else cfg.prior
    thresholds = None
    if wanted > 0 and cfg.sparse and cfg.classes == 2:
        thresholds = priors.fit(items, cfg.patch, seed=cfg.seed)
    cfg.prior = wanted if thresholds else 0.0
    return thresholds


def _anchors(items: list, cfg: FinetuneConfig, start: _Start, net, dev, margin: int, progress) -> Optional[list]:
    """The previous model's confident classes around the strokes when they continue a segmentation
    model of the same classes (``priors.anchor_maps``); ``cfg.anchor`` becomes the weight used."""
    wanted = SPARSE_ANCHOR if cfg.anchor is None else cfg.anchor
    if not (wanted > 0 and cfg.sparse and start.kind == "segmentation"):  # its classes are ours (check_classes)
        cfg.anchor = 0.0
        return None
    model = Model(net=net, kind="segmentation", net_config=net.unet.cfg, device=dev, classes=list(cfg.class_names),
                  patch=cfg.patch, normalization=get_recipe(cfg.recipe).normalization, amp=cfg.amp)
    net.eval()
    try:
        maps = priors.anchor_maps(items, model, cfg.patch, margin,
                                  progress=lambda i, n: progress(Progress("finetune: reading the model's answers", i, n)))
    finally:
        net.train()
    cfg.anchor = wanted
    return maps


def _default_steps_per_epoch(items: list, cfg: FinetuneConfig) -> int:
    tiles = sum(int((it.tile_counts > 0).sum() - it.val_tiles.sum()) for it in items)
    return int(min(250, max(10, math.ceil(tiles / cfg.batch))))


def _budget(cfg: FinetuneConfig, steps_per_epoch: int, continuing: bool = False) -> Budget:
    """The run's epochs, steps and minutes; none given means ``DEFAULT_EPOCHS`` and at least
    ``min_steps``, or for strokes ``SPARSE_STEPS`` (``SPARSE_CONTINUE_STEPS`` when ``continuing``
    a segmentation model)."""
    epochs = cfg.epochs
    if epochs is None and cfg.steps is None and cfg.minutes is None:
        if cfg.sparse:
            return Budget(steps=SPARSE_CONTINUE_STEPS if continuing else SPARSE_STEPS, steps_per_epoch=steps_per_epoch)
        epochs = max(DEFAULT_EPOCHS, math.ceil(cfg.min_steps / steps_per_epoch))
    return Budget(steps=cfg.steps, minutes=cfg.minutes, epochs=epochs, steps_per_epoch=steps_per_epoch)


def _checkpoint_meta(cfg: FinetuneConfig, net: SegmentationNet, names: list, colors: list, start: _Start,
                     items: list, val, instances: Optional[Sequence]) -> dict:
    """What every checkpoint of the run says about the model, where it started and its data (and,
    with ``instances``, the geometry maps it learnt)."""
    data = {"images": [it.image_source or it.name for it in items], "labels": [it.label_source for it in items],
            "annotated_pixels": _pixels_per_class(items, cfg.sparse, len(names)),
            "sparse": cfg.sparse, "val_tiles": int(len(val.images)), "val_on_train": val.on_train}
    meta = {"kind": "segmentation", "net": net.unet.cfg.to_dict(), "classes": list(names),
            "colors": [list(map(int, c)) for c in colors[: len(names)]], "config": cfg.to_dict(),
            "resolution": _resolution(items, cfg).to_dict(), "normalization": get_recipe(cfg.recipe).normalization,
            "stain": STAIN_METHOD if cfg.stain else None, "pretrained_from": start.provenance, "data": data}
    if instances is not None:
        meta["geometry"] = {"maps": "hv", "instances": [str(s) if isinstance(s, (str, Path)) else "array"
                                                        for s in instances]}
    return meta


def _pixels_per_class(items: list, sparse: bool, k: int) -> list:
    total = np.zeros(k + 1, np.int64)
    for it in items:
        c = it.counts[: k + 1]
        total[: len(c)] += c
    return (total[1 : k + 1] if sparse else total[:k]).tolist()


def _resolution(items: list, cfg: FinetuneConfig) -> Resolution:
    """The scale the model learnt at: the requested µm/px, else the images' own when they agree."""
    requested = cfg.resolution or Resolution()  # the default reads DEFAULT_MPP where known: the items say
    if requested.mpp is not None:
        return Resolution(requested.level, requested.mpp)
    mpps = [it.mpp for it in items]
    if all(m is not None for m in mpps) and max(mpps) <= 1.1 * min(mpps):
        return Resolution(requested.level, float(np.mean(mpps)))
    return Resolution(requested.level, None)
