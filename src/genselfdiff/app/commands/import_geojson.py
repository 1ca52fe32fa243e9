"""``genselfdiff import-geojson``: QuPath annotations as a label mask for training."""

from __future__ import annotations

import sys

ORDER = 55


def register(sub) -> None:
    p = sub.add_parser(
        "import-geojson", help="rasterise a QuPath GeoJSON export into a label mask",
        description="Turn the classified annotations and detections of a QuPath GeoJSON export (File > Export objects as "
                    "GeoJSON) into a PNG or TIFF label mask the size of an image (or of one of its pyramid "
                    "levels): 0 where no object lies, 1, 2, ... for the classes.")
    p.add_argument("geojson", metavar="FILE.geojson")
    p.add_argument("--like", required=True, metavar="IMAGE", help="the slide or image the objects were drawn on")
    p.add_argument("--out", required=True, metavar="MASK", help="label mask to write (.png, .tif or .tiff)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, metavar="N", help="pyramid level of IMAGE to match (default: 0)")
    res.add_argument("--downsample", type=float, metavar="F", help="level-0 pixels per mask pixel")
    p.add_argument("--class-names", metavar="A,B,...",
                   help="class of ids 1, 2, ... (default: classes in order of first appearance)")
    p.set_defaults(run=run)


def run(args) -> int:
    import math

    from ...errors import UserError
    from ...io.rasterize import read_geojson_labels
    from ...io.slides import open_slide

    slide = open_slide(args.like)
    H0, W0 = slide.shape[:2]
    if args.downsample is not None:
        if args.downsample <= 0:
            raise UserError(f"--downsample must be positive (got {args.downsample}).")
        downsample = args.downsample
        shape = (max(1, math.ceil(H0 / downsample)), max(1, math.ceil(W0 / downsample)))
    else:
        level = args.level or 0
        if not 0 <= level < len(slide.levels):
            raise UserError(f"{args.like} has {len(slide.levels)} pyramid level(s); level {level} does not exist.")
        shape = tuple(slide.levels[level].shape[:2])
        downsample = slide.downsample(level)
    names = None
    if args.class_names:
        names = ["background"] + [n.strip() for n in args.class_names.split(",")]
    labels, names, warnings = read_geojson_labels(args.geojson, shape, downsample=downsample, class_names=names)
    out = write_mask(args.out, labels)
    counts = [int(c) for c in __import__("numpy").bincount(labels.ravel(), minlength=len(names))]
    print(f"Wrote {out} ({shape[1]} x {shape[0]} pixels, downsample {downsample:g}, {labels.dtype}):")
    print(f"  {'id':>3}  {'class':<24} {'pixels':>10}")
    for k, name in enumerate(names):
        print(f"  {k:>3}  {name:<24} {counts[k] if k < len(counts) else 0:>10}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 1 if warnings else 0


def write_mask(path, labels):
    """Write a label mask as PNG or TIFF, atomically."""
    from pathlib import Path

    from ...errors import UserError
    from ...io.atomic import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise UserError(f"{path}: write the mask as .png, .tif or .tiff.")
    with atomic_path(path) as tmp:
        if suffix == ".png":
            from skimage.io import imsave

            imsave(tmp, labels, check_contrast=False)
        else:
            import tifffile

            tifffile.imwrite(tmp, labels, compression="zlib")
    return path
