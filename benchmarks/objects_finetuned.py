"""Objects from a fine-tuned model on the held-out MoNuSeg images that have nucleus ids.

Usage: .venv/bin/python benchmarks/objects_finetuned.py WORK MODEL.pt [MODEL.pt ...], where WORK is a
benchmarks/label_efficiency.py work folder (its half/ pyramids and its fine-tuned models).
Prints, per model and image, the AJI of `segment(..., instances=True)` and of plain connected
components of the same class labels (the baseline), PQ and the object counts.
"""
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from pathlib import Path

from _common import DATA, split
from scipy import ndimage as ndi
from skimage.io import imread

from genselfdiff.eval.metrics import aji, panoptic_quality
from genselfdiff.infer.segment import segment
from genselfdiff.nn.model import load_model

held, pool = split(DATA)
work = Path(sys.argv[1])
for ck in sys.argv[2:]:
    model = load_model(work / ck, "cpu")
    for p in held:
        inst = DATA / "instances" / p.name
        if not inst.exists():
            continue
        truth = imread(inst).astype(np.int64)
        r = segment(model, work / "half" / f"{p.stem}.ome.tif", skip_background=False, instances=True)
        H, W = truth.shape
        up = lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1)[:H, :W]
        ids = up(r.objects.ids.astype(np.int64))
        cc = up(ndi.label(r.labels == 1)[0])
        pq = panoptic_quality(ids, truth)
        print(ck, p.stem[:12], f"AJI objects {aji(ids, truth):.3f} connected components {aji(cc, truth):.3f}",
              f"PQ {pq['pq'] if isinstance(pq, dict) else pq}", f"count objects {len(np.unique(ids))-1} truth {len(np.unique(truth))-1}", flush=True)
