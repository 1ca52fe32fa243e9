"""Checkpoints' RNG state: a run resumes whatever GPUs are visible now (no GPU needed: torch.cuda is faked)."""

import random

import numpy as np
import pytest
import torch

from genselfdiff.io.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint


class FakeGPUs:
    """``torch.cuda`` as it looks with ``count`` GPUs: one generator state per GPU, set by index;
    an index past the last GPU fails as torch's does."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.states = count, {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def set_state(self, state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= self.count:
            raise IndexError(f"no GPU {index}: {self.count} visible")  # what torch raises in _lazy_call
        self.states[index] = state.clone()

    def set_all(self, states):
        for i, s in enumerate(states):
            self.set_state(s, i)


def saved_on(monkeypatch, count: int, tmp_path) -> dict:
    """The RNG state of a run saved with ``count`` GPUs visible, written and read back as a checkpoint."""
    gpus = FakeGPUs(monkeypatch, count)
    gpus.states = {i: torch.tensor([100 + i], dtype=torch.uint8) for i in range(count)}
    path = save_checkpoint(tmp_path / "run.last.pt", {"kind": "pretrained", "rng": capture_rng()})
    return load_checkpoint(path)["rng"]


@pytest.mark.parametrize("saved, visible", [(8, 1), (2, 4), (1, 1)])
def test_resume_restores_the_gpus_that_are_visible(monkeypatch, tmp_path, saved, visible):
    state = saved_on(monkeypatch, saved, tmp_path)
    assert len(state["cuda"]) == saved
    gpus = FakeGPUs(monkeypatch, visible)
    restore_rng(state)  # 8 -> 1 raised IndexError before
    for i in range(visible):
        want = 100 + i if i < saved else i  # restored where a state was saved, else left as it was
        assert gpus.states[i].item() == want


def test_a_state_saved_with_gpus_resumes_on_the_cpu(monkeypatch, tmp_path):
    state = saved_on(monkeypatch, 2, tmp_path)
    FakeGPUs(monkeypatch, 0)
    want = torch.rand(3)  # the CPU generator as saved (saved_on captured it just before)
    restore_rng(state)  # nothing to put the GPU states into; the rest is restored
    assert torch.equal(torch.rand(3), want)


def test_cpu_generators_come_back(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = load_checkpoint(save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng()}))["rng"]
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    restore_rng(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
