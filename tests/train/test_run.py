"""The training-job scaffold: when a loop ends and why, one optimisation step, the resume file."""

import time

import pytest
import torch

from genselfdiff.errors import UserError
from genselfdiff.train.run import (
    Budget,
    TrainLoop,
    last_path,
    load_resume_state,
    optimise,
    restore_resume_state,
    save_resume_state,
)


def run(loop, epoch_every=None):
    step = 0
    while loop.goes_on(step, step // epoch_every if epoch_every else None):
        step += 1
    return step


def test_the_budget_ends_a_loop_before_the_stop_is_asked():
    asked = []
    loop = TrainLoop(Budget(steps=3), lambda: asked.append(1) or False)
    assert run(loop) == 3 and len(asked) == 3 and not loop.stopped
    loop = TrainLoop(Budget(epochs=2, steps_per_epoch=4), lambda: True)
    assert not loop.goes_on(8, 2) and not loop.stopped
    assert run(TrainLoop(Budget(epochs=2, steps_per_epoch=4), lambda: False), epoch_every=4) == 8


def test_a_stop_ends_a_loop_and_says_so():
    calls = iter(range(100))
    loop = TrainLoop(Budget(steps=10), lambda: next(calls) >= 4)
    assert run(loop) == 4 and loop.stopped
    loop = TrainLoop(Budget(minutes=0), lambda: True)  # the budget wins a tie
    assert run(loop) == 0 and not loop.stopped


def test_ranks_decide_together_every_few_steps():
    """Under DDP the stop and the time are agreed every ``agree_every`` steps (a collective call
    every rank must make); a step budget is the same everywhere and ends the loop at once."""
    agreed = []

    def agree(flags):
        agreed.append(flags)
        return [flags[0], len(agreed) == 3]  # another rank asks to stop at the third agreement

    loop = TrainLoop(Budget(steps=100), lambda: False, agree=agree, agree_every=4)
    assert run(loop) == 8 and loop.stopped and agreed == [[False, False]] * 3
    agreed.clear()
    loop = TrainLoop(Budget(steps=6), lambda: False, agree=lambda flags: agreed.append(flags) or flags, agree_every=4)
    assert run(loop) == 6 and not loop.stopped and len(agreed) == 2  # at steps 0 and 4, not at 6
    loop = TrainLoop(Budget(minutes=0), lambda: True, agree=lambda flags: flags, agree_every=4)
    assert run(loop) == 0 and not loop.stopped  # spent and stopped on the same check: the budget ended it


def test_the_progress_total_and_the_fraction_follow_the_clock():
    loop = TrainLoop(Budget(minutes=1), lambda: False, since=time.perf_counter() - 30)  # half the time is used
    assert 19 <= loop.total(10) <= 20 and 0.5 <= loop.fraction(0) < 0.51
    assert TrainLoop(Budget(steps=12, minutes=1), lambda: False, since=time.perf_counter() - 30).total(10) == 12


def test_one_optimisation_step_clips_and_sets_the_learning_rate():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    optimise(opt, (w * torch.tensor([30.0, 40.0])).sum(), grad_clip=5.0, lr=0.1)  # gradient (30, 40), norm 50
    assert torch.allclose(w.detach(), torch.tensor([3.0 - 0.3, 4.0 - 0.4])) and opt.param_groups[0]["lr"] == 0.1
    optimise(opt, w.sum())  # no clipping; the learning rate stays
    assert torch.allclose(w.detach(), torch.tensor([2.6, 3.5]))


def test_the_resume_state_holds_the_optimizer_and_the_rng(tmp_path):
    out = tmp_path / "model.pt"
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w], lr=0.5)
    optimise(opt, (w ** 2).sum())
    save_resume_state(out, {"kind": "test", "step": 1}, opt)
    expected = torch.rand(3)
    ckpt = load_resume_state(out, lambda c: c.get("kind") == "test", "testing")
    assert last_path(out).name == "model.last.pt" and ckpt["step"] == 1
    again = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    restore_resume_state(ckpt, again)
    assert torch.equal(torch.rand(3), expected) and again.param_groups[0]["lr"] == 0.5
    with pytest.raises(UserError, match="not the resume state of a pretraining run"):
        load_resume_state(out, lambda c: False, "pretraining")
    with pytest.raises(UserError, match="Nothing to resume"):
        load_resume_state(tmp_path / "other.pt", lambda c: True, "pretraining")


def test_a_run_on_the_shared_loop_keeps_its_best_network_and_may_end_early(tmp_path):
    """The hooks of TrainingRun: batches from the run's step, one step each, what follows it,
    the choice of the kept network and both files."""
    from genselfdiff.io.checkpoint import load_checkpoint
    from genselfdiff.train.run import TrainingRun

    class Toy(TrainingRun):
        def __init__(self):
            w = torch.nn.Parameter(torch.zeros(1))
            super().__init__(tmp_path / "toy.pt", torch.nn.ParameterList([w]), torch.optim.SGD([w], lr=1.0))
            self.closed = False

        def batches(self):
            try:
                step = self.step
                while True:
                    yield step
                    step += 1
            finally:
                self.closed = True

        def train_step(self, batch, loop):
            assert batch == self.step  # the stream follows the run's step
            optimise(self.optimizer, -self.net[0].sum())  # w grows by 1 per step
            return float(batch)

        def after_step(self, loss, loop, progress):
            score = {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.2}[self.step]
            improved, kept = self.consider(score, margin=1e-4, ties=True, keep_weights=True, note=self.step)
            self.save(best=kept)
            return self.since_best >= 2  # patience 2

        def resume_payload(self):
            return {"kind": "toy", "step": self.step}

        def kept_payload(self):
            return {"kind": "toy", "step": self.best["step"], "w": self.best["state"]["0"]}

    run = Toy()
    assert run.fit(TrainLoop(Budget(steps=10), lambda: False), progress=None)  # ended early, at step 4
    assert run.step == 4 and run.closed and list(run.window.losses) == [0.0, 1.0, 2.0, 3.0]
    assert run.best["step"] == 3 and run.best["note"] == 3  # the tie at step 3 keeps the later network
    assert float(run.best["state"]["0"]) == 3.0 and float(run.net[0].detach()) == 4.0
    assert float(load_checkpoint(tmp_path / "toy.pt")["w"]) == 3.0
    assert load_resume_state(tmp_path / "toy.pt", lambda c: c["kind"] == "toy", "toy")["step"] == 4


def test_the_training_steps_run_without_the_slide_reader():
    """A benchmark times the engine's own steps on images in memory, on a machine without dask."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["dask"] = None  # importing dask now fails
import numpy as np, torch
from genselfdiff.nn.unet import to_segmentation
from genselfdiff.train.config import FinetuneConfig, PretrainConfig
from genselfdiff.train.finetune_run import SegmentationStep
from genselfdiff.train.pretrain import DiffusionStep
from genselfdiff.train.recipe import get_recipe

step = DiffusionStep(PretrainConfig.from_preset("tiny", patch=32, batch=2), "cpu")
x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
losses = [float(step(x, s)) for s in range(3)]
assert step.ema is not None and all(np.isfinite(losses)), losses
for name in ("default", "official"):
    cfg = FinetuneConfig.from_preset("tiny", recipe=name, lr=1e-3)
    net = get_recipe(name).segmentation_net(step.cfg.net, 2, step.net.state_dict())
    seg = SegmentationStep.from_config(cfg, net, "cpu")
    y = (x[..., 0] > 128).astype(np.int64)
    assert np.isfinite(seg((x, y))) and seg.normalization == get_recipe(name).normalization
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
