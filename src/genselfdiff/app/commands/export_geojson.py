"""``genselfdiff export-geojson``: a label image as QuPath annotations or detections."""

from __future__ import annotations

import sys

ORDER = 50


def register(sub) -> None:
    p = sub.add_parser(
        "export-geojson", help="turn a label image into a GeoJSON file that QuPath imports",
        description="Write one polygon (holes kept) per connected region of each class of a label image "
                    "(OME-Zarr segmentation output, PNG or TIFF) as a GeoJSON FeatureCollection in level-0 "
                    "pixel coordinates. Open it in QuPath with File > Import objects from file, or drag it "
                    "onto the image.")
    p.add_argument("labels", metavar="LABELS", help="label image: OME-Zarr output, PNG or TIFF")
    p.add_argument("--out", required=True, metavar="FILE.geojson", help="GeoJSON file to write")
    p.add_argument("--detections", action="store_true",
                   help="write QuPath detections (light, for many nuclei) instead of annotations (editable)")
    p.add_argument("--objects", action="store_true",
                   help="one QuPath detection per object of a segment --instances output, with its class and "
                        "measurements (area, perimeter, circularity, mean haematoxylin OD)")
    p.add_argument("--image", metavar="IMAGE", help="with --objects: the image the output was segmented from, for "
                                                    "the haematoxylin measurement (default: the one the output names)")
    p.add_argument("--tile", type=int, default=2048, metavar="N",
                   help="read the labels N x N pixels at a time (default: %(default)s)")
    p.add_argument("--simplify", type=float, default=0.35, metavar="PX",
                   help="largest outline deviation in label pixels; 0 = exact pixel outlines (default: %(default)s)")
    p.add_argument("--class-names", metavar="A,B,...",
                   help="names of labels 1, 2, ... (default: from the OME-Zarr metadata, else 'class N')")
    p.add_argument("--scale", type=float, default=1.0, metavar="F",
                   help="level-0 pixels per label pixel, if the labels are at a lower resolution (default: 1)")
    p.add_argument("--pretty", action="store_true", help="one feature per line")
    p.set_defaults(run=run)


def run(args) -> int:
    from ...errors import UserError
    from ...io.qupath import export_geojson
    from ..cli import ProgressBar, StopOnInterrupt

    names = None
    if args.class_names:
        names = ["background"] + [n.strip() for n in args.class_names.split(",")]
    if args.scale <= 0:
        raise UserError(f"--scale must be positive (got {args.scale}).")
    if args.simplify < 0:
        raise UserError(f"--simplify must be 0 or more (got {args.simplify}).")
    if args.objects:
        from ...objects.detections import export_objects

        with StopOnInterrupt() as stop, ProgressBar(unit="tile") as bar:
            n = export_objects(args.labels, args.out, image=args.image, tile=args.tile, simplify=args.simplify,
                               pretty=args.pretty, progress=bar, should_stop=stop)
        if stop.requested:
            print(f"Stopped early: wrote the {n} detections of the tiles done so far to {args.out}.", file=sys.stderr)
            return 1
        print(f"Wrote {n} object detections to {args.out}.")
        return 0
    with StopOnInterrupt() as stop, ProgressBar(unit="tile") as bar:
        n = export_geojson(args.labels, args.out, class_names=names, tile=args.tile,
                           object_type="detection" if args.detections else "annotation",
                           simplify=args.simplify, scale=args.scale, pretty=args.pretty,
                           progress=bar, should_stop=stop)
    kind = "detections" if args.detections else "annotations"
    if stop.requested:
        print(f"Stopped early: wrote the {n} {kind} of the tiles done so far to {args.out}.", file=sys.stderr)
        return 1
    print(f"Wrote {n} {kind} to {args.out}.")
    return 0
