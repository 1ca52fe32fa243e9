"""``genselfdiff evaluate``: Dice, IoU, HD95 and the object scores of predictions against ground truth."""

from __future__ import annotations

import sys

ORDER = 40


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score predicted label images against ground truth",
        description="Pair predictions (PNG, TIFF or OME-Zarr) with ground-truth masks (PNG or TIFF) by file "
                    "name and report per image and on average: Dice (F1), IoU, the 95th-percentile Hausdorff "
                    "distance (pixels, and µm with --scale-um) and, for instance maps, the object scores: AJI, "
                    "PQ (DQ, SQ), GlaS object F1 and Dice, and the count error. Predicted objects come from "
                    "segment --instances (NAME.ome.zarr/instances or NAME_instances.png) when present.")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder (or file) of predicted labels")
    p.add_argument("--truth", required=True, metavar="DIR", help="folder (or file) of ground-truth labels")
    p.add_argument("--csv", metavar="FILE", help="write the per-image table and the mean as CSV")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--instances", action="store_true",
                   help="score objects even where the truth is a class mask: its objects are its connected "
                        "components; predicted objects come from segment --instances where present, else "
                        "the connected components of the predicted foreground")
    p.add_argument("--pixel-size", "--scale-um", dest="pixel_size", metavar="UM",
                   help="µm per pixel of the truths, to report HD95 in µm too")
    p.set_defaults(run=run)


def run(args) -> int:
    from ...eval.evaluate import evaluate
    from ..cli import ProgressBar

    with ProgressBar(unit="image") as bar:
        report = evaluate(args.pred, args.truth, pixel_size=args.pixel_size,
                          instances=True if args.instances else None, progress=bar)
    print(report.table())
    if args.csv:
        print(f"Wrote {report.to_csv(args.csv)}", file=sys.stderr)
    if args.json:
        print(f"Wrote {report.to_json(args.json)}", file=sys.stderr)
    for label, stems in (("prediction(s) without a truth", report.missing_truth),
                         ("truth(s) without a prediction", report.missing_prediction)):
        if stems:
            print(f"{len(stems)} {label}: {', '.join(stems)}", file=sys.stderr)
    for stem, error in report.failures:
        print(f"{stem}: {error}", file=sys.stderr)
    return 0 if report.complete else 1
