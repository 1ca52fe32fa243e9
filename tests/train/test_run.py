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
