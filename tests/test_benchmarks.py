"""Every benchmark's ``--quick`` form runs as users run it (``python -m benchmarks.NAME --quick``).

On synthetic tissue in MoNuSeg's layout (benchmarks.common.write_synthetic_set, given as
``--data``), so the run is the same whether or not the MoNuSeg folder is here. The forms run
as subprocesses two at a time (one torch thread each), all started by the first test that
needs one; each test checks its own: exit status 0, and the command, machine and summary lines
every benchmark prints. paper_scale and gpu_check are tested elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYN = "{synthetic}"  # replaced by the synthetic data folder
WORK = "{work}"  # replaced by a work folder of the form's own

QUICK_FORMS = {
    "train_step": ["train_step", "--quick"],
    "train_step finetune": ["train_step", "--quick", "--stage", "finetune"],
    "tiled_inference": ["tiled_inference", "--quick", "--work", WORK],
    "label_efficiency": ["label_efficiency", "--quick", "--data", SYN, "--work", WORK],
    "objects split": ["objects", "split", "--quick", "--data", SYN, "--work", WORK],
    "objects split tiled": ["objects", "split", "--quick", "--tiled-core", "128", "--data", SYN, "--work", WORK],
    "objects model": ["objects", "model", "--quick", "--oracle", "--data", SYN, "--work", WORK],
    "readme_pipeline": ["readme_pipeline", "--quick", "--data", SYN, "--work", WORK],
    "cpu_speed": ["cpu_speed", "--quick", "--work", WORK],
    "folds": ["folds", "--quick", "--data", SYN, "--work", WORK],
    "instances": ["instances", "--quick", "--data", SYN, "--work", WORK],
    "corrections": ["corrections", "--quick", "--data", SYN, "--work", WORK],
    "resume": ["resume", "--quick", "--work", WORK],
    "whole_slide": ["whole_slide", "--quick", "--work", WORK],
}


def _run(args: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"benchmarks.{args[0]}", *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _common():
    """benchmarks/common.py, loaded by path (the repository root need not be on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory, request):
    """Name -> future of the quick form's CompletedProcess; the selected ones started at once, two at a time."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    base = tmp_path_factory.mktemp("benchmarks")
    synthetic = _common().write_synthetic_set(base / "synthetic")
    pool = ThreadPoolExecutor(2)
    futures = {}
    for name, form in QUICK_FORMS.items():
        if name not in selected:
            continue
        work = base / name.replace(" ", "_")
        args = [str(synthetic) if a == SYN else str(work) if a == WORK else a for a in form]
        futures[name] = pool.submit(_run, args)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", list(QUICK_FORMS))
def test_quick_form(quick_runs, name):
    r = quick_runs[name].result()
    out = r.stdout.splitlines()
    said = f"{name}: exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert r.returncode == 0 and "Traceback" not in r.stderr, said
    assert len(out) > 2 and out[0].startswith("command: ") and f"benchmarks.{QUICK_FORMS[name][0]}" in out[0], said
    assert out[1].startswith("machine: "), said
    assert sum(line.startswith("summary: ") for line in out) == 1, said


def test_missing_data_folder_is_one_sentence(tmp_path):
    r = _run(["objects", "split", "--data", str(tmp_path / "nowhere")])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data" in lines[0], r.stderr


def test_without_monuseg_quick_forms_use_synthetic_tissue_and_full_ones_say_data(tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    common = _common()
    monkeypatch.setattr(common, "DEFAULT_DATA", tmp_path / "no" / "monuseg")
    folder = common.data_folder(Namespace(data=None, quick=True), tmp_path)
    held, pool = common.split(folder)
    assert (len(held), len(pool)) == (2, 8) and common.data_name(folder) == "synthetic"
    assert all((folder / sub / held[0].name).exists() for sub in ("masks", "instances"))
    with pytest.raises(SystemExit) as end:
        common.data_folder(Namespace(data=None, quick=False), tmp_path)
    assert end.value.code == 2 and "--data" in capsys.readouterr().err
