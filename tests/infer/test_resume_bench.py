"""The parts of benchmarks/resume.py and benchmarks/whole_slide.py whose mistakes would not show in a
quick run's exit status: the lazy slide is half tissue at 0.25 µm/px with a true pyramid, the
comparison counts every differing pixel on every level, and bad arguments end in one sentence."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import resume, whole_slide  # noqa: E402


def test_island_slide_is_half_tissue_at_40x_with_a_pyramid(tmp_path):
    from genselfdiff.io.slides import open_slide
    from genselfdiff.io.tissue import TissueMap

    path = whole_slide.island_slide(tmp_path / "s.ome.tif", 2048, 1536, cell=256)  # islands of 181 px from 37
    slide = open_slide(path)
    assert tuple(slide.levels[0].shape) == (1536, 2048, 3) and slide.mpp == pytest.approx(0.25)
    assert [tuple(level.shape[:2]) for level in slide.levels[1:3]] == [(768, 1024), (384, 512)]
    glass = np.asarray(slide.levels[0][:512, :512]).min(axis=2) > 240  # JPEG blurs edges by a few pixels
    assert glass[:30].all() and glass[:, 226:285].all() and glass[45:210, 45:210].mean() < 0.05
    # Level 1 is level 0 halved (the same islands), and the tissue map sees half the slide as tissue.
    level1 = np.asarray(slide.levels[1][:256, :256]).min(axis=2) > 240
    assert level1[:14].all() and level1[24:104, 24:104].mean() < 0.05
    assert TissueMap(slide).fraction == pytest.approx(0.5, abs=0.05)


def test_differing_pixels_counts_every_level(tmp_path):
    from genselfdiff.io.omezarr import LabelImage

    def write(path, labels):
        image = LabelImage.create(path, shape=labels.shape, chunk=64, levels=2, run={"r": 1})
        for i, j in image.units():
            image.write((i, j), labels[i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64])
        return path

    labels = np.random.default_rng(0).integers(0, 3, (100, 130)).astype(np.uint8)
    other = labels.copy()
    other[0, 0] = (other[0, 0] + 1) % 3  # on level 0 and level 1 (level 1 = level 0 [::2, ::2])
    other[99, 1] = (other[99, 1] + 1) % 3  # on level 0 only
    a, b = write(tmp_path / "a.ome.zarr", labels), write(tmp_path / "b.ome.zarr", other)
    assert resume.differing_pixels(a, a) == (0, 0, 2)
    assert resume.differing_pixels(a, b) == (2, 3, 2)


@pytest.mark.parametrize("name,args", [("resume", ["--kills", "0"]), ("resume", ["--side", "100"]),
                                       ("whole_slide", ["--baseline", "64"]), ("whole_slide", ["--cell", "8"])])
def test_bad_arguments_are_one_sentence(name, args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--work", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--" in lines[0], r.stderr
