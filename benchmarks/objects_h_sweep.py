"""The watershed's h on a fine-tuned model's masks: AJI on every MoNuSeg image with nucleus ids
that the model did not train on (8 of the pool, 2 held out), against connected components.

Usage: .venv/bin/python benchmarks/objects_h_sweep.py  (after benchmarks/label_efficiency.py
--work /tmp/exp/F1 ... made /tmp/exp/F1/ft_random_3_s0.pt; edit ``work`` for another run).
"""

import numpy as np
import torch

torch.set_num_threads(1)
from pathlib import Path
from dataclasses import replace
from skimage.io import imread
from scipy import ndimage as ndi
from _common import split, DATA
from genselfdiff.model import load_model
from genselfdiff.segment import segment
from genselfdiff.instances import split_objects, SplitParameters
from genselfdiff.metrics import aji
held, pool = split(DATA)
work = Path("/tmp/exp/F1"); model = load_model(work / "ft_random_3_s0.pt", "cpu")
imgs = [p for p in pool[3:] if (DATA / "instances" / p.name).exists()] + [p for p in held if (DATA / "instances" / p.name).exists()]
from genselfdiff.synthetic import write_pyramidal_tiff
hs = [0.2, 0.5, 1.0, 2.0]
res = {h: [] for h in hs}; cc = []
for p in imgs:
    src = work / "half" / f"{p.stem}.ome.tif"
    if not src.exists():
        write_pyramidal_tiff(src, imread(p)[..., :3], mpp=0.2527, min_side=400)
    r = segment(model, src, skip_background=False)
    mask = r.labels == 1
    truth = imread(DATA / "instances" / p.name).astype(np.int64); H, W = truth.shape
    up = lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1)[:H, :W]
    cc.append(aji(up(ndi.label(mask)[0]), truth))
    for h in hs:
        ids = split_objects(mask.astype(np.float32), mask, mpp=0.5054, params=replace(SplitParameters(), h_um=h))
        res[h].append(aji(up(ids.astype(np.int64)), truth))
    print(p.stem[:12], "held" if p in held else "pool", f"cc {cc[-1]:.3f}", " ".join(f"h{h} {res[h][-1]:.3f}" for h in hs), flush=True)
print("mean cc", np.mean(cc), {h: round(float(np.mean(v)), 3) for h, v in res.items()})
