"""Finding input files and pairing them: which paths are images, their stems, masks and GeoJSON by stem.

Folders are only listed, never opened, so a folder of thousands of slides costs a directory
walk. An image's *stem* is its name without image suffixes (``a/b.ome.tif`` -> ``b``); masks
and QuPath GeoJSON exports are matched to images by stem (:func:`match_by_stem`), with or
without one of :data:`MASK_SUFFIXES` (``a.svs`` <- ``a.png``, ``a_mask.tif``, ``a.geojson``);
:func:`pair_annotations` is that matching for a training run, with what to tell the user, and
:func:`training_files` all of a run's files in one call (its images of instance ids too).
:func:`fingerprint` and :func:`same_slides` say whether two lists of files are the same slides
wherever they are kept (a resumed run checks its data with them).

Nothing here decodes pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf8")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ZARR_SUFFIXES = (".zarr",)
IMAGE_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES + ZARR_SUFFIXES
GEOJSON_SUFFIXES = (".geojson", ".json")
# Mask files are matched to images by stem, with or without one of these suffixes.
MASK_SUFFIXES = ("", "_mask", "_masks", "-mask", "_label", "_labels", "-labels", "_annotation", "_annotations")


def image_stem(path) -> str:
    """File name without its image suffixes: ``a/b.ome.tif`` -> ``b``."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr") + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_image_path(path) -> bool:
    p = Path(path)
    return p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")


def find_images(sources: Iterable) -> list:
    """Expand files and folders (recursively) into image paths, sorted, without duplicates.

    A ``.zarr`` folder counts as one image. A path that does not exist is a :class:`UserError`.
    """
    found = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise UserError(f"{p} does not exist.")
        if p.is_dir() and not p.name.lower().endswith(ZARR_SUFFIXES):
            for child in sorted(p.rglob("*")):
                if is_image_path(child) and not any(part.lower().endswith(".zarr") for part in child.relative_to(p).parts[:-1]):
                    found.append(child)
        else:
            found.append(p)
    seen, unique = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def image_paths(sources: Sequence) -> list:
    """:func:`find_images`, with a :class:`UserError` when there are none (for the command line)."""
    paths = find_images(sources)
    if not paths:
        raise UserError(f"No images found in {', '.join(map(str, sources))} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return paths


def files_with(sources: Sequence, suffixes: tuple) -> list:
    """Files (and, recursively, files in folders) whose names end with one of ``suffixes``."""
    files = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise UserError(f"{p} does not exist.")
        files += sorted(f for f in p.rglob("*") if f.name.lower().endswith(suffixes)) if p.is_dir() else [p]
    return files


def match_by_stem(images: Sequence, sources: Sequence, suffixes: Optional[tuple] = None):
    """Pair image paths with annotation files by stem: ``a.svs`` <- ``a.png``, ``a_mask.tif``, ...

    ``sources`` are files or folders (searched recursively) of mask images, or, with
    ``suffixes`` (e.g. :data:`GEOJSON_SUFFIXES`), of files with those endings. Returns
    ``(pairs, images_without_annotation, unused_files)``; an image that is itself used
    as some image's mask (``a_mask.png`` next to ``a.png``) is dropped from the images.
    """
    files = find_images(sources) if suffixes is None else files_with(sources, suffixes)
    by_stem = {}
    for f in files:
        by_stem.setdefault(_stem(f, suffixes).lower(), f)
    pairs, unmatched, used = [], [], set()
    for img in images:
        stem = image_stem(img).lower()
        hit = next((by_stem[stem + s] for s in MASK_SUFFIXES
                    if stem + s in by_stem and Path(by_stem[stem + s]).resolve() != Path(img).resolve()), None)
        if hit is None:
            unmatched.append(Path(img))
        else:
            pairs.append((Path(img), Path(hit)))
            used.add(Path(hit).resolve())
    unmatched = [p for p in unmatched if p.resolve() not in used]
    return pairs, unmatched, [Path(f) for f in files if Path(f).resolve() not in used]


def pair_annotations(images: Sequence, sources: Sequence, *, geojson: bool = False) -> tuple:
    """The training pairs of ``images`` and their masks (or, with ``geojson``, QuPath GeoJSON
    exports) from ``sources`` by stem (:func:`match_by_stem`), and the lines that tell the user
    what was left out. ``(pairs, notes)``; a :class:`UserError` when nothing matches."""
    pairs, unmatched, unused = match_by_stem(images, sources, suffixes=GEOJSON_SUFFIXES if geojson else None)
    kind = "GeoJSON file" if geojson else "mask"
    if not pairs:
        found = f" (found: {_listed(unused)})" if unused else ""
        raise UserError(f"No {kind} matches any of the {len(images)} image(s) by file name{found}; name them after "
                        "their images (a.svs -> a.png or a_mask.png).")
    notes = []
    if unmatched:
        notes.append(f"warning: {len(unmatched)} image(s) have no {kind} and are left out: {_listed(unmatched)} "
                     f"({kind}s are matched by file stem, e.g. a.svs <- a.png or a_mask.png).")
    if unused:
        notes.append(f"note: {len(unused)} {kind}(s) match no image: {_listed(unused)}.")
    return pairs, notes


def training_files(image_sources: Sequence, sources: Sequence, *, geojson: bool = False,
                   instances: Optional[Sequence] = None) -> tuple:
    """The images found in ``image_sources`` (:func:`image_paths`) that have a mask (or, with
    ``geojson``, a QuPath GeoJSON export) in ``sources`` (:func:`pair_annotations`), and, given
    ``instances`` (files or folders), each one's image of instance ids, matched by stem as masks are.
    ``(pairs, ids or None, notes)``; a :class:`UserError` for the first image without ids."""
    pairs, notes = pair_annotations(image_paths(image_sources), sources, geojson=geojson)
    if not instances:
        return pairs, None, notes
    matched, unmatched, _ = match_by_stem([image for image, _ in pairs], instances)
    if unmatched:
        raise UserError(f"No image of ids in {', '.join(map(str, instances))} matches {unmatched[0].name}; name it "
                        "after its image, as masks are (a.png <- a.png or a_mask.png), or leave the image out.")
    return pairs, [ids for _, ids in matched], notes


def _listed(paths: list) -> str:
    return ", ".join(p.name for p in paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")


def _stem(path, suffixes: Optional[tuple]) -> str:
    name = Path(path).name
    for s in suffixes or ():
        if name.lower().endswith(s):
            return name[: -len(s)]
    return image_stem(path)


def fingerprint(files) -> list:
    """[name, size in bytes] of each file (size None for a folder such as OME-Zarr): what says
    that two lists are the same slides wherever they are kept."""
    return [[Path(f).name, Path(f).stat().st_size if Path(f).is_file() else None] for f in files]


def same_slides(saved: dict, now: dict) -> bool:
    """Whether a run's recorded data (its ``files`` and ``fingerprint``) lists the same slides as
    ``now``, by name and size, so that a moved or copied folder is the same; runs saved before the
    sizes were recorded compare by name."""
    if "fingerprint" in saved:
        return saved["fingerprint"] == now["fingerprint"]
    return [Path(f).name for f in saved.get("files", [])] == [Path(f).name for f in now["files"]]
