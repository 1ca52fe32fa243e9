"""Data-parallel pretraining: two CPU processes with the gloo backend stay in step."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from genselfdiff.io.checkpoint import load_checkpoint
from genselfdiff.train.config import PretrainConfig
from genselfdiff.train.run import last_path

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, slides: str, out: str, dump: str) -> None:
    """What torchrun would start: the environment names the group, pretrain joins it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small CI machine
    from genselfdiff.train.pretrain import pretrain

    cfg = PretrainConfig.from_preset("tiny", patch=32, batch=2, steps=STEPS, val_every=2, val_batches=2,
                                     warmup_steps=0, ema_decay=0.9)
    result = pretrain([slides], out, cfg, device="cpu")
    torch.save({"weights": result.net.state_dict(), "steps": result.steps, "history": result.history}, dump)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from skimage.io import imsave

    from genselfdiff.app.synthetic import synthetic_tissue

    folder = tmp_path_factory.mktemp("ddp-slides")
    for i in range(3):
        imsave(folder / f"t{i}.png", synthetic_tissue((96, 96), seed=i)[0], check_contrast=False)
    return folder


def test_two_gloo_ranks_train_in_step(slides, tmp_path):
    out = tmp_path / "ddp.pt"
    dumps = [tmp_path / f"rank{r}.pt" for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(slides), str(out), str(dumps[r])))
             for port in [free_port()] for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    a, b = (torch.load(d, weights_only=True) for d in dumps)
    assert a["steps"] == b["steps"] == STEPS
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    # Both ranks report the same (all-reduced) losses.
    assert [h.get("loss") for h in a["history"]] == [h.get("loss") for h in b["history"]]
    ckpt = load_checkpoint(last_path(out))
    assert ckpt["step"] == STEPS and ckpt["data"]["world_size"] == 2 and "optimizer" in ckpt
    assert all(torch.equal(ckpt["ema_state_dict"][k], a["weights"][k]) for k in a["weights"])
    assert load_checkpoint(out)["kind"] == "pretrained"


@pytest.mark.slow
def test_torchrun_command_line(slides, tmp_path):
    """The documented launch: torchrun --nproc_per_node=2 -m genselfdiff pretrain ..."""
    out = tmp_path / "run.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "genselfdiff", "pretrain", str(slides), "--out", str(out), "--preset", "tiny",
           "--patch", "32", "--batch", "2", "--steps", "2", "--val-every", "0", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Pretrained 2 steps") == 1  # only rank 0 speaks
    assert load_checkpoint(last_path(out))["data"]["world_size"] == 2
