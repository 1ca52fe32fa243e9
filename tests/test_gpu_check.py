"""benchmarks/gpu_check.py, the one command a GPU run starts with, in its CPU form: every step still runs.

The check is only worth something on the day a GPU is lent if it has not rotted in between, so
CI runs its ``--device cpu --quick`` form (tiny network, small images, a few steps) here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import gpu_check  # noqa: E402

STEPS = ["environment", "data", "pretrain (eager)", "pretrain --resume", "finetune masks, default",
         "finetune strokes, default", "finetune masks, official", "finetune strokes, official",
         "segment 512², cpu vs cpu 256²", "segment --instances", "torchrun, 1 gloo process",
         "dask LocalCluster, 1 worker", "pytest -m gpu"]


def test_the_cpu_form_runs_every_step(tmp_path):
    pytest.importorskip("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--quick", "--work", str(tmp_path / "work"),
                           "--json", str(tmp_path / "gpu_check.json")], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["step"]: r for r in report["rows"]}
    assert list(rows) == STEPS, done.stdout[-3000:]
    failed = {name: r["why"] for name, r in rows.items() if r["status"] == "fail"}
    assert not failed and done.returncode == 0, (failed, done.stdout[-3000:])
    skipped = [name for name, r in rows.items() if r["status"] == "skip"]
    assert skipped == ([] if torch.cuda.is_available() else ["pytest -m gpu"])  # the GPU tests skip themselves
    assert rows["pretrain --resume"]["figures"]["steps"] == gpu_check.QUICK.resume_steps
    assert rows["segment 512², cpu vs cpu 256²"]["figures"]["agreement"] >= gpu_check.AGREEMENT
    assert rows["finetune masks, official"]["figures"]["precision"] == "fp32"
    assert rows["torchrun, 1 gloo process"]["figures"] == {"backend": "gloo", "world_size": 1,
                                                          "steps": gpu_check.QUICK.ddp_steps}
    assert f"summary: {len(STEPS) - len(skipped)} passed, 0 failed, {len(skipped)} skipped" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_without_a_gpu_the_full_check_stops_in_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, str(CHECK), "--work", str(tmp_path / "work")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "No CUDA GPU is visible to torch here; on a machine without one run "
        "python benchmarks/gpu_check.py --device cpu --quick"]


def test_a_folder_of_something_else_is_not_emptied(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, str(CHECK), "--quick", "--work", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and (tmp_path / "notes.txt").read_text() == "mine"


def test_why_a_step_failed_is_one_line():
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                 "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert gpu_check.why_line(traceback) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    cli = "Fine-tuning ...\r50%|#####\ngenselfdiff: error: No image in x.\n"
    assert gpu_check.why_line(cli) == "genselfdiff: error: No image in x."
    assert gpu_check.why_line("last words\n\n") == "last words"


def test_the_benchmarks_of_a_gpu_run_train_through_the_engine():
    """No training loop of their own: what they measure is what users run."""
    for name in ("gpu_check.py", "paper_scale.py"):
        assert ".backward(" not in (CHECK.parent / name).read_text()



# --- benchmarks/paper_scale.py: the study a GPU run makes; its safety nets, tested on the CPU ------

@pytest.fixture(scope="module")
def study():
    from benchmarks import paper_scale

    return paper_scale


def test_the_study_refuses_a_data_folder_without_images_and_masks(tmp_path):
    import numpy as np
    from skimage.io import imsave

    (tmp_path / "empty").mkdir()
    (tmp_path / "no-masks" / "images").mkdir(parents=True)
    for i in range(5):
        imsave(tmp_path / "no-masks" / "images" / f"{i}.png", np.zeros((8, 8, 3), np.uint8), check_contrast=False)
    for folder, expected in (("empty", "images"), ("no-masks", "masks/")):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_scale.py"), "--work",
                               str(tmp_path / "work"), "--data", str(tmp_path / folder)], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr  # one sentence, no traceback
        assert expected in lines[0] and str(tmp_path / folder) in lines[0]


def test_out_of_memory_is_caught_on_every_torch_the_project_allows(monkeypatch, study):
    """torch.OutOfMemoryError exists from torch 2.5 on; pyproject allows 2.2, which has only torch.cuda's."""
    assert study.out_of_memory() is torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    assert study.out_of_memory() is torch.cuda.OutOfMemoryError


class _Args:
    compile, quick, checkpoints, pretrain_minutes, pretrain_lr, max_batch = True, False, 2, 1.0, 2e-4, 128


def _default_arm(monkeypatch, study, tmp_path, failures: list):
    """pretrain_default with the probe and the arm's pretraining replaced: each call of the arm raises
    the next of ``failures`` (None: succeeds); returns (result, the (batch, compile) of every call, the
    saves of results.json). Each call must start afresh: no model left by the one before."""
    calls = []
    monkeypatch.setattr(study, "probe_batch", lambda *a: {"batch": 64, "how": "stub"})

    def arm(name, args, preset, sources, dev, work, batch=None, compile_=False):
        calls.append((batch, compile_))
        assert not (work / "default_pretrained.pt").exists()
        (work / "default_pretrained.pt").write_bytes(b"half a run")
        error = failures.pop(0)
        if error is not None:
            raise error
        return {"batch": batch, "compiled": compile_, "checkpoints": []}

    monkeypatch.setattr(study, "pretrain_arm", arm)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    saved = []
    result = study.pretrain_default(_Args(), "paper", [], torch.device("cpu"), tmp_path, {}, lambda: saved.append(1))
    return result, calls, saved


def test_a_compiler_error_trains_the_arm_eager_and_says_so(monkeypatch, study, tmp_path):
    result, calls, saved = _default_arm(monkeypatch, study, tmp_path, [RuntimeError("inductor: no C compiler"), None])
    assert calls == [(64, True), (64, False)] and result["compiled"] is False
    assert any("torch.compile failed (RuntimeError: inductor: no C compiler)" in n for n in result["notes"])
    assert len(saved) == 2  # results.json is rewritten before anything is trained, and after the failure


def test_out_of_memory_halves_the_batch_and_starts_again(monkeypatch, study, tmp_path):
    oom = torch.cuda.OutOfMemoryError
    result, calls, _ = _default_arm(monkeypatch, study, tmp_path, [oom("CUDA out of memory"), oom("again"), None])
    assert calls == [(64, True), (32, True), (16, True)] and result["batch"] == 16
    with pytest.raises(oom):  # at batch 8 there is nothing left to halve: the arm fails (and is recorded)
        _default_arm(monkeypatch, study, tmp_path, [oom("x")] * 4)


def test_the_official_arm_is_the_official_recipe(study):
    cfg = study.arm_config("official", "paper", _Args(), batch=128, compile_=True, minutes=1.0)
    want = dict(recipe="official", amp=False, lr=1e-4, batch=8, ema_decay=0.0, grad_clip=0.0, warmup_steps=0)
    assert {k: getattr(cfg, k) for k in want} == want  # fp32, 1e-4, batch 8, no EMA, clipping or warm-up
    assert cfg.compile is False and cfg.minutes == 1.0


def test_both_arms_come_first_in_the_fine_tuning_runs(study):
    starts = {"default": [{"steps": 100, "path": "a"}, {"steps": 200, "path": "b"}],
              "official": [{"steps": 50, "path": "c"}]}
    groups = study.plan_runs(_Args(), starts)
    assert [(r[0], r[1], r[4]) for r in groups[0]] == [
        ("default", "random", "masks"), ("official", "random", "masks"),
        ("default", "pretrained@200", "masks"), ("official", "pretrained@50", "masks")]
    assert [(r[0], r[1]) for r in groups[1]] == [("default", "random"), ("default", "pretrained@200")]
    assert {r[1] for r in groups[2]} == {"pretrained@100"}
    assert [(r[0], r[4]) for r in groups[-1]] == [("official", "strokes")] * 2
    # an arm whose pretraining failed still has its random start
    assert ("official", "random", "masks") in [(r[0], r[1], r[4]) for r in study.plan_runs(_Args(), {
        "default": [], "official": []})[0]]
