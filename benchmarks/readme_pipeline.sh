#!/usr/bin/env bash
# The README's command-line pipeline on MoNuSeg, every option at its default except the pixel
# size (the PNGs state none): pretrain 10 minutes on the 24 images outside the held-out split
# (no labels), fine-tune on the first 3 labelled images of benchmarks/_common.split, segment the
# 6 held-out images and evaluate them; prints Otsu on haematoxylin for the same images last.
# Usage: benchmarks/readme_pipeline.sh [WORK_DIR]   (from the repository root, after `make`)
set -euo pipefail
W=${1:-/tmp/genselfdiff-readme-pipeline}
PY=${PY:-.venv/bin/python}
GS=${GS:-.venv/bin/genselfdiff}
mkdir -p "$W"/unlabelled "$W"/tiles "$W"/masks "$W"/held "$W"/truth
"$PY" - "$W" <<'PY'
import shutil, sys
from pathlib import Path

import numpy as np
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.io import imread, imsave

sys.path.insert(0, "benchmarks")
from _common import DATA, dice, machine, read_rgb, split

W = Path(sys.argv[1])
held, pool = split(DATA)
print("machine:", machine("cpu"))
for p in pool:
    shutil.copy(p, W / "unlabelled" / p.name)
for p in pool[:3]:
    shutil.copy(p, W / "tiles" / p.name)
for p in pool[:3] + held:  # masks as a user would give them: 0 background, 1 nucleus
    imsave(W / ("masks" if p in pool else "truth") / p.name,
           (imread(DATA / "masks" / p.name) > 0).astype(np.uint8), check_contrast=False)
for p in held:
    shutil.copy(p, W / "held" / p.name)
otsu = [dice((h := rgb2hed(read_rgb(p))[..., 0]) > threshold_otsu(h), imread(DATA / "masks" / p.name) > 0)
        for p in held]
(W / "otsu.txt").write_text(f"Otsu on haematoxylin, same images: mean Dice {np.mean(otsu):.4f}\n")
PY
export OMP_NUM_THREADS=1
time "$GS" pretrain "$W"/unlabelled --out "$W"/pretrained.pt --pixel-size 0.25 --minutes 10 --quiet
time "$GS" finetune --images "$W"/tiles --masks "$W"/masks --model "$W"/pretrained.pt --out "$W"/seg.pt \
    --pixel-size 0.25 --class-names background,nucleus
time "$GS" segment "$W"/seg.pt "$W"/held --out "$W"/results --pixel-size 0.25 --png
"$GS" evaluate --pred "$W"/results --truth "$W"/truth --pixel-size 0.25
cat "$W"/otsu.txt
