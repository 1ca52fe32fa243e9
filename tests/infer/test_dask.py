"""Segmentation on a dask.distributed cluster gives the same labels as one process."""

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

from genselfdiff.app.synthetic import synthetic_tissue, write_pyramidal_tiff  # noqa: E402
from genselfdiff.infer.segment import load_labels, segment  # noqa: E402
from genselfdiff.io.checkpoint import save_checkpoint  # noqa: E402
from genselfdiff.nn.config import get_preset  # noqa: E402
from genselfdiff.nn.model import load_model  # noqa: E402
from genselfdiff.nn.unet import UNet, to_segmentation  # noqa: E402

TINY = get_preset("tiny").net


@pytest.fixture(scope="module")
def cluster():
    # Worker processes, as on a real cluster: tasks, the model source and results must pickle.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_class=distributed.Nanny) as c, distributed.Client(c) as client:
        yield c, client


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    rgb, _ = synthetic_tissue((192, 160), seed=12, glass=0.3)
    slide = write_pyramidal_tiff(d / "slide.ome.tif", rgb, mpp=0.5, min_side=256, tile=64)
    torch.manual_seed(0)
    net = to_segmentation(UNet(TINY), 2)
    ckpt = save_checkpoint(d / "seg.pt", {"kind": "segmentation", "net": {**TINY.to_dict(), "out_channels": 2},
                                          "state_dict": net.state_dict(), "classes": ["background", "nucleus"],
                                          "colors": [[0, 0, 0], [255, 0, 0]], "config": {"patch": 64},
                                          "resolution": {"level": 0, "mpp": None}})
    return slide, ckpt, d


KW = dict(tile=64, overlap=16, chunk=64)


def test_cluster_matches_one_process(cluster, slide_and_model):
    c, client = cluster
    slide, ckpt, d = slide_and_model
    model = load_model(ckpt, "cpu")
    local = segment(model, slide, d / "local.ome.zarr", probabilities=True, **KW)
    seen = []
    # By address, as the CLI's --scheduler does: workers load the model from its checkpoint.
    remote = segment(model, slide, d / "remote.ome.zarr", probabilities=True, scheduler=c.scheduler_address,
                     progress=seen.append, **KW)
    assert not remote.stopped and remote.chunks_computed == local.chunks_computed == 9
    assert remote.tiles == local.tiles and remote.skipped_tiles == local.skipped_tiles > 0
    assert seen and seen[-1].done == seen[-1].total == local.tiles
    for a, b in zip(load_labels(d / "local.ome.zarr"), load_labels(d / "remote.ome.zarr")):
        assert (np.asarray(a) == np.asarray(b)).all()
    import zarr

    pa = zarr.open_array(d / "local.ome.zarr" / "probabilities" / "0", mode="r")[:]
    pb = zarr.open_array(d / "remote.ome.zarr" / "probabilities" / "0", mode="r")[:]
    np.testing.assert_allclose(pa, pb, atol=1e-5)


def test_cluster_with_an_in_memory_model_resumes(cluster, slide_and_model):
    _, client = cluster
    slide, ckpt, d = slide_and_model
    model = load_model(ckpt, "cpu")
    model.path = None  # no checkpoint: the weights are sent to the workers once
    out = d / "resumed.ome.zarr"
    seen = []
    first = segment(model, slide, out, scheduler=client, progress=seen.append,
                    should_stop=lambda: len(seen) >= 2, **KW)
    assert first.stopped and 2 <= first.chunks_computed < 9
    rest = segment(model, slide, out, scheduler=client, **KW)
    assert not rest.stopped and rest.chunks_resumed >= first.chunks_computed  # running tasks may finish after a stop
    assert rest.chunks_resumed + rest.chunks_computed == 9
    reference = segment(model, slide, **KW).labels
    assert (np.asarray(load_labels(out)[0]) == reference).all()


def test_an_in_memory_official_recipe_model_gets_its_own_input_scaling_on_the_workers(cluster, slide_and_model):
    """A model trained on [0, 1] inputs (the official recipe) sent as weights, not as a file."""
    _, client = cluster
    slide, ckpt, d = slide_and_model
    model = load_model(ckpt, "cpu")
    model.path, model.normalization = None, "[0, 1]"
    out = d / "official.ome.zarr"
    remote = segment(model, slide, out, scheduler=client, probabilities=True, **KW)
    assert not remote.stopped and remote.chunks_computed == 9
    local = segment(model, slide, d / "official-local.ome.zarr", probabilities=True, **KW)
    import zarr

    pa = zarr.open_array(local.path / "probabilities" / "0", mode="r")[:]
    pb = zarr.open_array(out / "probabilities" / "0", mode="r")[:]
    np.testing.assert_allclose(pb, pa, atol=1e-5)
    # The test can fail: the same weights on [-1, 1] inputs give other probabilities.
    model.normalization = "[-1, 1]"
    other = segment(model, slide, d / "official-wrong.ome.zarr", probabilities=True, **KW)
    pc = zarr.open_array(other.path / "probabilities" / "0", mode="r")[:]
    assert np.abs(pc - pa).max() > 1e-3


def test_auto_device_spreads_workers_over_the_gpus(monkeypatch):
    """device="auto" on a machine with several GPUs: each worker its own, not all on cuda:0."""
    from genselfdiff.infer.dask import worker_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # In-process workers, so that they see the patched torch; names 0, 1, 2 as LocalCluster gives.
    with distributed.LocalCluster(n_workers=3, processes=False, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        client.wait_for_workers(3)
        workers = sorted(client.scheduler_info()["workers"].items(), key=lambda w: int(w[1]["name"]))
        chosen = [client.submit(worker_device, "auto", workers=[address], pure=False).result()
                  for address, _ in workers]
        assert chosen == ["cuda:0", "cuda:1", "cuda:0"]
        assert client.submit(worker_device, "cpu", pure=False).result() == "cpu"  # a named device is kept
        assert client.submit(worker_device, "cuda:1", pure=False).result() == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one visible GPU per worker (dask-cuda)
    assert worker_device("auto", worker=type("W", (), {"name": 3})()) == "auto"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name, want in ((0, "cuda:0"), ("0", "cuda:0"), (5, "cuda:1"), ("host-7", "cuda:3")):
        assert worker_device("auto", worker=type("W", (), {"name": name})()) == want
