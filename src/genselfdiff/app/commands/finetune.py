"""``genselfdiff finetune``: train a segmentation model from images and their masks or GeoJSON."""

from __future__ import annotations

import argparse
import sys

ORDER = 20


def register(sub) -> None:
    from ..cli import add_device_argument, add_pixel_size_arguments

    p = sub.add_parser(
        "finetune", help="fine-tune a (pretrained) diffusion U-Net for segmentation from masks or scribbles",
        description="Fine-tune the whole diffusion U-Net with a new output head (t = 0) on labelled images. "
                    "Loss by default: soft Dice + cross-entropy (--loss paper: the paper's structural-similarity "
                    "+ focal loss); strokes (--sparse) add a colour-affinity term and, for nuclei, a haematoxylin "
                    "prior on the unpainted pixels. Budget, none given: masks 50 epochs and at least 2500 steps, "
                    "keeping the best validation Dice; strokes (--sparse): 1000 steps, keeping the last network. "
                    "A correction round (--sparse with --model PREVIOUS.pt, a segmentation model of the same "
                    "classes, and every stroke so far): 400 steps, keeping the previous model's confident answers "
                    "on unpainted pixels (--anchor). "
                    "Masks are matched to images by file "
                    "stem (a.svs <- a.png, a_mask.tif, a_labels.png, ...). Dense masks: 0 = background, "
                    "1..K = classes. --sparse scribbles: 0 = unlabelled (ignored), 1 = background, 2.. = classes. "
                    "Without --model the preset's network starts from random weights; on a CPU, start there: "
                    "pretraining at CPU budgets did not improve fine-tuning (docs/pretraining.md). "
                    "Ctrl-C stops after the current step and keeps a valid checkpoint.")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    ann = p.add_mutually_exclusive_group(required=True)
    ann.add_argument("--masks", nargs="+", metavar="PATH", help="mask images (files or folders), matched by stem")
    ann.add_argument("--annotations", nargs="+", metavar="FILE.geojson",
                     help="QuPath GeoJSON exports (files or a folder), one per image, matched by stem")
    p.add_argument("--instances", nargs="+", metavar="PATH",
                   help="label images of nucleus ids (0 = none, one id per object, inside its class of the mask), "
                        "files or folders matched to the images by stem as masks are: the network also learns the "
                        "borders between touching objects (a geometry head), which segment --instances then uses")
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="segmentation checkpoint to write")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", metavar="PRETRAINED.pt", help="pretrained (or segmentation) checkpoint to start from")
    start.add_argument("--preset", choices=["auto", "tiny", "small", "paper"], default="auto",
                       help="network for random initialisation; auto: paper on CUDA, the CPU's best by measurement "
                            "otherwise (default: auto; with --model: the model's)")
    p.add_argument("--sparse", action="store_true", help="labels are scribbles: 0 unlabelled, k = class k-1")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--classes", type=int, metavar="N", help="number of classes including background")
    cls.add_argument("--class-names", metavar="A,B,...", help="class names, background first")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, metavar="N",
                        help="default, none given: 50 epochs and at least 2500 steps; strokes (--sparse): 1000 "
                             "steps, 400 in a correction round")
    budget.add_argument("--steps", type=int, metavar="N")
    budget.add_argument("--minutes", type=float, metavar="M")
    p.add_argument("--patch", type=int, help="patch side in pixels (default: the preset's)")
    p.add_argument("--batch", type=int, help="patches per step (default: the preset's)")
    p.add_argument("--lr", type=float,
                   help="Adam learning rate (default, by network and start: tiny 3e-4 from a trained model, 1e-3 "
                        "from scratch; small 3e-4; paper and the official recipe 1e-4)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="constant (the paper's; default for masks) or cosine: decay to 0 over the budget "
                        "(default for strokes, which keep their last network)")
    p.add_argument("--recipe", choices=["default", "official"], default="default",
                   help="official: the official code's fresh final block and head, [0, 1] inputs, initialisation, "
                        "augmentations, loss, fp32 and 150 epochs keeping the best validation loss "
                        "(default: %(default)s)")
    p.add_argument("--loss", choices=["paper", "official", "ce", "dice", "dice_ce"],
                   help="dice_ce = soft Dice + cross-entropy (default); paper = structural similarity + focal; "
                        "official = the same with the official code's batch-mean cross-entropy")
    p.add_argument("--anchor", type=float, metavar="W",
                   help="correction rounds: weight of the previous model's confident answers on unpainted pixels "
                        "(default 1 when --sparse strokes continue a segmentation model; 0 switches it off)")
    p.add_argument("--no-stain-normalization", dest="stain", action="store_false", default=None,
                   help="feed the network each image's own colours; by default every image's H&E stain is mapped "
                        "to one reference first (Macenko), which the model then expects when it segments")
    p.add_argument("--steps-per-epoch", type=int, metavar="N", help="default: about one pass over the annotated tiles")
    p.add_argument("--val-fraction", type=float, metavar="F", help="share of annotated tiles held out (default 0.1)")
    p.add_argument("--patience", type=int, metavar="N", help="epochs without a better validation Dice before stopping (default 10, never before step 2500; masks only: "
                        "a run on strokes keeps its latest network and uses its whole budget)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, metavar="N",
                     help="pyramid level to train at (default: 0.5 µm/px where the pixel size is known, else level 0)")
    res.add_argument("--mpp", type=float, metavar="UM", help="train at this many µm per pixel")
    add_pixel_size_arguments(p)
    p.add_argument("--no-augment", action="store_true", help="switch off flips, rotations, blur, colour, stain (HED) and elastic")
    p.add_argument("--workers", type=int, help="threads preparing batches (default 0)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA and on CPUs with native bf16; --no-amp keeps fp32 (default on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    add_device_argument(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ...errors import UserError
    from ...io.files import training_files
    from ...io.pixelsize import Resolution
    from ...io.rasterize import training_labels
    from ...train.augment import Augment
    from ...train.config import FinetuneConfig
    from ...train.finetune import finetune
    from ..cli import ProgressBar, StopOnInterrupt

    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    if names is not None and (len(names) < 2 or not all(names)):
        raise UserError("--class-names needs at least two non-empty names, background first (e.g. background,nucleus).")
    if args.instances and (not args.masks or args.sparse):
        raise UserError("--instances goes with dense --masks: every pixel of a class needs the id of its object.")
    resolution = Resolution(level=args.level or 0, mpp=args.mpp) if args.level is not None or args.mpp else None
    pairs, instances, notes = training_files(args.images, args.masks or args.annotations, geojson=not args.masks,
                                             instances=args.instances)
    for note in notes:
        print(note, file=sys.stderr)
    colors = None
    if args.annotations:
        labels, names, colors, warns = training_labels(pairs, resolution, names, sparse=args.sparse,
                                                        pixel_size=args.pixel_size,
                                                        override_pixel_size=args.override_pixel_size)
        for w in warns:
            print(f"warning: {w}", file=sys.stderr)
    else:
        labels = [m for _, m in pairs]

    overrides = dict(patch=args.patch, batch=args.batch, lr=args.lr, lr_schedule=args.lr_schedule,
                     loss=args.loss, epochs=args.epochs,
                     steps=args.steps, minutes=args.minutes, steps_per_epoch=args.steps_per_epoch,
                     val_fraction=args.val_fraction, patience=args.patience, classes=args.classes,
                     class_names=names, colors=colors, workers=args.workers, amp=args.amp, seed=args.seed, sparse=args.sparse,
                     resolution=resolution, recipe=args.recipe, anchor=args.anchor,
                     stain=args.stain)
    if args.no_augment:
        overrides["augment"] = Augment.off()
    cfg = FinetuneConfig.from_preset(args.preset, **overrides)
    network = "the network auto chooses for this device" if args.preset == "auto" else f"the {args.preset} network"
    print(f"Fine-tuning {'from ' + args.model if args.model else network + ' from random weights'} "
          f"on {len(pairs)} image(s), {'sparse' if cfg.sparse else 'dense'} labels, loss {cfg.loss}.", file=sys.stderr)
    with StopOnInterrupt() as stop, ProgressBar() as bar:
        result = finetune([i for i, _ in pairs], labels, args.out, cfg, pretrained=args.model, device=args.device,
                          progress=_EpochPrinter(bar, cfg.sparse), should_stop=stop, resume=args.resume,
                          pixel_size=args.pixel_size, override_pixel_size=args.override_pixel_size,
                          instances=instances)
    _summary(result, cfg.sparse)
    return 0


class _EpochPrinter:
    """The progress bar, plus one line per epoch: the per-class Dice of held-out tiles (masks), or the
    loss on held-out strokes (a Dice on strokes along object cores reads near 1 and says nothing)."""

    def __init__(self, bar, sparse: bool):
        self.bar, self.sparse = bar, sparse

    def __call__(self, p) -> None:
        self.bar(p)
        if isinstance(p.payload, dict) and "epoch" in p.payload:
            from tqdm import tqdm

            d = p.payload
            head = f"epoch {d['epoch']:3d}  step {p.done:6d}  loss {p.metrics.get('loss', float('nan')):.4f}  "
            if self.sparse:
                tqdm.write(head + f"held-out strokes loss {_f(d.get('val_loss', float('nan')))}", file=sys.stderr)
                return
            per = ", ".join(f"{n} {_f(v)}" for n, v in zip(d["classes"], d["per_class_dice"]))
            tqdm.write(head + f"val Dice {_f(d['val_dice'])}{' (best)' if d['improved'] else ''}  [{per}]",
                       file=sys.stderr)


def _f(v) -> str:
    return "  n/a" if v != v else f"{v:.3f}"


def _summary(result, sparse: bool) -> None:
    what = "stopped by request" if result.stopped else ("stopped early (no improvement)" if result.early_stopped else "finished")
    print(f"\nFine-tuning {what} after {result.steps} steps in {result.seconds / 60:.1f} min.", file=sys.stderr)
    if sparse:  # the latest network is kept; strokes cannot score it (see _EpochPrinter)
        print("Strokes give no honest Dice: look at what the model does on your images (genselfdiff segment "
              "... --png), or score it on masks it never saw (genselfdiff evaluate).", file=sys.stderr)
        print(f"Model: {result.path}")
        return
    print(f"Best Dice on held-out tiles of the training images {_f(result.best_dice)} at step {result.best_step} "
          "(optimistic for new images):", file=sys.stderr)
    for name, v in zip(result.classes, result.per_class_dice):
        print(f"  {name:<24} {_f(v)}", file=sys.stderr)
    print(f"Model: {result.path}")
