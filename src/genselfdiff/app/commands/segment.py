"""``genselfdiff segment``: segment images or whole slides into OME-Zarr label images."""

from __future__ import annotations

import argparse
import sys

ORDER = 30


def register(sub) -> None:
    from ...infer.config import SegmentConfig
    from ..cli import add_device_argument, add_pixel_size_arguments

    engine = SegmentConfig()  # the defaults the help names are the engine's

    p = sub.add_parser(
        "segment", help="segment images or whole slides with a fine-tuned model into OME-Zarr labels",
        description="Apply a segmentation model to each image, tile by tile at the resolution the model was "
                    "trained at, and write OUT/NAME.ome.zarr: an NGFF 0.5 multiscale label image (class ids, "
                    "level 0 the shape of the image's level 0). Tiles without tissue are skipped unless "
                    "--all-tiles. Ctrl-C stops cleanly; running the same command again computes only the "
                    "missing chunks.")
    p.add_argument("model", metavar="MODEL.pt", help="segmentation checkpoint (genselfdiff finetune)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="slides, images or folders of them")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for NAME.ome.zarr (and NAME.png)")
    p.add_argument("--tile", type=int, help="network input side in pixels (default: from the model, its training patch or larger; 256 for tiny and 512 for small/paper models trained on smaller patches)")
    p.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles, twice the halo (default tile/8)")
    p.add_argument("--batch", type=int, help=f"tiles per forward pass (default: {engine.batch})")
    p.add_argument("--png", action="store_true", help="also write OUT/NAME.png (level-0 class ids) for images up to 100 Mpx")
    p.add_argument("--probabilities", action="store_true", help="also store float32 class probabilities")
    p.add_argument("--instances", action="store_true",
                   help="also split every foreground class into objects (one id each, seamless across tiles): "
                        "NAME.ome.zarr/instances (uint32), NAME_objects.csv (objects per class and per mm² of "
                        "tissue) and, with --png, NAME_instances.png")
    p.add_argument("--instances-of", metavar="A,B", help="split only these classes (by name) into objects; "
                                                         "implies --instances")
    p.add_argument("--all-tiles", action="store_true", help="run the network on glass too (no tissue detection)")
    p.add_argument("--tta", action="store_true", help="test-time flips: average each tile's class probabilities "
                                                      "over its 4 flips (none, left-right, up-down, both); 4x slower")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA and on CPUs with native bf16; --no-amp keeps fp32 (default: on, "
                        "except for a model trained in fp32 only)")
    p.add_argument("--threads", type=int, help="CPU threads for the network (default: one per core); fewer leave "
                                                 "cores to other work")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run the tiles on this dask.distributed scheduler "
                                                          "(e.g. tcp://host:8786); workers must see the same files")
    add_pixel_size_arguments(p)
    add_device_argument(p)
    p.set_defaults(run=run)


def build_config(args):
    """The :class:`~genselfdiff.infer.config.SegmentConfig` of what the user chose (the rest is the engine's)."""
    from ...infer.config import SegmentConfig, chosen

    instances_of = [n.strip() for n in args.instances_of.split(",") if n.strip()] if args.instances_of else None
    return SegmentConfig(**chosen(tile=args.tile, overlap=args.overlap, batch=args.batch, amp=args.amp,
                                threads=args.threads),
                         skip_background=not args.all_tiles, tta=args.tta, probabilities=args.probabilities,
                         png=args.png, instances=args.instances or bool(instances_of),
                         instances_of=instances_of or None, device=args.device)


def run(args) -> int:
    from ...errors import UserError
    from ...infer.segment import segment_batch
    from ...io.files import image_paths
    from ...nn.model import load_model
    from ..cli import EXIT_OK, EXIT_PARTIAL, ProgressBar, StopOnInterrupt

    config = build_config(args)
    images = image_paths(args.images)
    model = load_model(args.model, config.device)
    model.require_segmentation()
    print(f"Segmenting {len(images)} image(s) with {args.model} ({len(model.classes)} classes: "
          f"{', '.join(map(str, model.classes))}) on {model.device}"
          f"{' via ' + args.scheduler if args.scheduler else ''}.", file=sys.stderr)
    with StopOnInterrupt() as stop, ProgressBar(unit="tile") as bar:
        results = segment_batch(model, images, args.out, config, scheduler=args.scheduler, progress=bar,
                                should_stop=stop, pixel_size=args.pixel_size,
                                override_pixel_size=args.override_pixel_size)
    failed = _summary(results, len(images))
    if results and failed == len(results) == len(images):
        # Nothing could be segmented: a usage problem (wrong model, unsupported files), exit 2.
        first = results[0][1]
        raise UserError(first if len(images) == 1 else f"None of the {len(images)} images could be segmented; "
                        f"the first: {first}")
    return EXIT_PARTIAL if failed else EXIT_OK


def _summary(results, n_images) -> int:
    from ...infer.segment import SegmentResult

    failed = 0
    print(file=sys.stderr)
    for image, r in results:
        if isinstance(r, SegmentResult):
            state = "stopped (run again to resume)" if r.stopped else "done"
            extra = f", {r.chunks_resumed} chunk(s) resumed" if r.chunks_resumed else ""
            print(f"  {image}: {state}, {r.tiles} tiles ({r.skipped_tiles} without tissue){extra}, "
                  f"{r.seconds:.1f} s, {r.mpx_per_s:.3g} Mpx/s -> {r.path}"
                  f"{' + ' + str(r.png) if r.png else ''}", file=sys.stderr)
            if r.objects is not None and r.objects.path is not None:
                counts = ", ".join(f"{n} {name}" for name, n in r.objects.counts.items())
                files = [r.objects.path] + [p for p in (r.objects.png, r.objects.summary) if p]
                print(f"    objects: {counts} -> {' + '.join(map(str, files))}", file=sys.stderr)
            if r.skipped_tiles:
                print(f"    skipped {r.skipped_share:.0%} of tiles as glass (no tissue; --all-tiles runs them)",
                      file=sys.stderr)
            for note in r.notes:
                print(f"    {note}", file=sys.stderr)
        else:
            failed += 1
            print(f"  {image}: FAILED: {r}", file=sys.stderr)
    skipped = n_images - len(results)
    ok = sum(1 for _, r in results if isinstance(r, SegmentResult) and not r.stopped)
    print(f"{ok} of {n_images} image(s) segmented, {failed} failed"
          f"{f', {skipped} not started' if skipped else ''}.", file=sys.stderr)
    return failed
