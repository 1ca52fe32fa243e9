"""Pretraining end to end on tiny synthetic tissue: learning, resume, stop, sampling, bad input, the data stream."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage.io import imsave

from genselfdiff.app.cli import main
from genselfdiff.app.synthetic import synthetic_tissue
from genselfdiff.errors import UserError
from genselfdiff.io.checkpoint import load_checkpoint
from genselfdiff.io.pixelsize import Resolution
from genselfdiff.io.tissue import tissue_mask
from genselfdiff.nn.model import load_model
from genselfdiff.nn.sampling import sample_images
from genselfdiff.train.config import PretrainConfig
from genselfdiff.train.patches import OpenSlide, PatchStream, plan_data
from genselfdiff.train.pretrain import pretrain
from genselfdiff.train.run import last_path

TINY = dict(patch=32, batch=4, val_batches=2, warmup_steps=0)


def write_tissue(folder, n, side=128, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, _ = synthetic_tissue((side, side), seed=seed + i, glass=0.2)
        imsave(folder / f"tissue{i}.png", rgb, check_contrast=False)
    return folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_tissue(tmp_path_factory.mktemp("slides"), 3)


@pytest.fixture(scope="module")
def stopped_run(slides, tmp_path_factory):
    """A run stopped by its cancel check after 3 steps (shared by the stop and sampling tests)."""
    out = tmp_path_factory.mktemp("stop") / "model.pt"
    calls = iter(range(1000))
    cfg = PretrainConfig.from_preset("tiny", steps=50, val_every=0, **TINY)
    result = pretrain([slides], out, cfg, device="cpu", should_stop=lambda: next(calls) >= 3)
    return out, result


def test_tiny_run_lowers_the_loss(slides, tmp_path):
    cfg = PretrainConfig.from_preset("tiny", steps=40, val_every=10, lr=1e-3, ema_decay=0, seed=0,
                                     **{**TINY, "batch": 8})
    result = pretrain([slides], tmp_path / "m.pt", cfg, device="cpu")
    val = [h["val_loss"] for h in result.history if "val_loss" in h]
    train = [h["loss"] for h in result.history if "loss" in h]
    assert len(val) == 4 and len(train) == 40
    # Validation uses fixed patches, timesteps and noise, so this is not luck of the draw.
    assert val[-1] < val[0] - 0.05
    assert np.mean(train[-15:]) < np.mean(train[:10])
    assert result.best_val_loss == min(val) and result.best_step == 40
    assert result.validation == "held-out files" and not result.stopped and result.skipped == []
    ckpt = load_checkpoint(result.path)
    assert ckpt["kind"] == "pretrained" and ckpt["step"] == 40 and ckpt["best_val_loss"] == result.best_val_loss
    assert PretrainConfig.from_dict(ckpt["config"]) == replace(cfg, workers=0)  # the engine's choice on a CPU
    assert ckpt["schedule"] == {"kind": "quadratic", "timesteps": 1000, "beta_start": pytest.approx(1e-4),
                                "beta_end": pytest.approx(0.02)}
    assert len(ckpt["data"]["files"]) == 3 and ckpt["data"]["train_files"] == 2
    assert "optimizer" not in ckpt and "optimizer" in load_checkpoint(last_path(result.path))


def test_max_timestep_keeps_training_and_validation_to_the_low_noise_levels(slides, tmp_path, monkeypatch):
    import genselfdiff.train.pretrain as module

    seen = []

    def recording(schedule, x0, t, noise):
        seen.append(t.clone())
        return real(schedule, x0, t, noise)

    real = module.q_sample
    monkeypatch.setattr(module, "q_sample", recording)
    cfg = PretrainConfig.from_preset("tiny", steps=6, val_every=3, max_timestep=50, **TINY)
    result = pretrain([slides], tmp_path / "m.pt", cfg, device="cpu")
    t = torch.cat(seen)
    assert len(t) >= 6 * TINY["batch"] and int(t.max()) < 50  # 24 training draws and the validation's
    assert len(set(t.tolist())) > 5  # spread over the allowed levels, not stuck at one
    assert load_checkpoint(result.path)["config"]["max_timestep"] == 50
    with pytest.raises(UserError, match="between 1 and 1000"):
        pretrain([slides], tmp_path / "n.pt", replace(cfg, max_timestep=1001), device="cpu")


def test_resume_continues_identically(slides, tmp_path):
    cfg = PretrainConfig.from_preset("tiny", steps=4, val_every=2, ema_decay=0.9, warmup_steps=2,
                                     **{k: v for k, v in TINY.items() if k != "warmup_steps"})
    straight = pretrain([slides], tmp_path / "a.pt", cfg, device="cpu")
    half = pretrain([slides], tmp_path / "b.pt", PretrainConfig(**{**cfg.__dict__, "steps": 2}), device="cpu")
    assert half.steps == 2
    # Resume with data-loading workers: the stream does not depend on their number.
    more = PretrainConfig(**{**cfg.__dict__, "workers": 2})
    resumed = pretrain([slides], tmp_path / "b.pt", more, device="cpu", resume=True)
    assert resumed.steps == 4
    a, b = load_checkpoint(last_path(tmp_path / "a.pt")), load_checkpoint(last_path(tmp_path / "b.pt"))
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_resume_from_a_moved_folder_continues_identically_without_a_warning(slides, tmp_path):
    import shutil
    import warnings

    cfg = PretrainConfig.from_preset("tiny", steps=4, val_every=2, seed=1, **TINY)
    pretrain([slides], tmp_path / "a.pt", cfg, device="cpu")
    pretrain([slides], tmp_path / "b.pt", replace(cfg, steps=2), device="cpu")
    moved = shutil.copytree(slides, tmp_path / "elsewhere" / "slides")  # the same files, another place
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain([moved], tmp_path / "b.pt", cfg, device="cpu", resume=True)
    assert not [w for w in caught if "differ" in str(w.message)]  # that would be a false alarm
    a, b = load_checkpoint(last_path(tmp_path / "a.pt")), load_checkpoint(last_path(tmp_path / "b.pt"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    (moved / "tissue0.png").unlink()  # really different slides still warn
    with pytest.warns(UserWarning, match="slides differ"):
        pretrain([moved], tmp_path / "b.pt", replace(cfg, steps=5), device="cpu", resume=True)


def test_stop_leaves_a_loadable_resumable_checkpoint(stopped_run, slides):
    out, result = stopped_run
    assert result.stopped and result.steps == 3
    model = load_model(out, "cpu")
    assert model.kind == "pretrained" and model.patch == 32
    state = load_checkpoint(last_path(out))
    assert state["step"] == 3 and "optimizer" in state
    cfg = PretrainConfig.from_preset("tiny", steps=5, val_every=0, **TINY)
    assert pretrain([slides], out.with_name("copy.pt"), cfg, device="cpu").steps == 5


def test_sample_images_and_the_sample_command(stopped_run, tmp_path, capsys):
    out, _ = stopped_run
    a = sample_images(out, 3, device="cpu", seed=1, timesteps=4)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, sample_images(out, 3, device="cpu", seed=1, timesteps=4))
    seen = []
    partial = sample_images(out, 2, device="cpu", timesteps=10, progress=seen.append,
                            should_stop=lambda: len(seen) >= 2)
    assert partial.shape == (2, 32, 32, 3) and len(seen) == 2
    png = tmp_path / "grid.png"
    assert main(["sample", str(out), "-n", "5", "--out", str(png), "--timesteps", "3", "--device", "cpu",
                 "--quiet"]) == 0
    from skimage.io import imread

    assert imread(png).shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)  # 3 columns, 2 rows, 2-px gaps


def test_minutes_budget_ends_the_run(slides, tmp_path, capsys):
    out = tmp_path / "timed.pt"
    assert main(["pretrain", str(slides), "--out", str(out), "--preset", "tiny", "--patch", "32", "--batch", "2",
                 "--minutes", "0.03", "--val-every", "0", "--device", "cpu", "--quiet"]) == 0
    state = load_checkpoint(last_path(out))
    assert state["config"]["minutes"] == 0.03 and state["config"]["steps"] is None
    assert "Pretrained" in capsys.readouterr().out  # ended by the budget, not stopped
    assert load_model(out, "cpu").kind == "pretrained"


def test_ctrl_c_stops_cleanly_with_a_resumable_checkpoint(slides, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ctrlc.pt"
    cmd = [sys.executable, "-m", "genselfdiff", "pretrain", str(slides), "--out", str(out), "--preset", "tiny",
           "--patch", "32", "--batch", "2", "--val-every", "1", "--device", "cpu", "--quiet"]  # no budget: until Ctrl-C
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not last_path(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Stopped pretraining after" in stdout and "Traceback" not in stderr
    state = load_checkpoint(last_path(out))
    assert state["step"] >= 1 and "optimizer" in state
    assert load_model(out, "cpu").kind == "pretrained"


def cli(*args):
    return main(["pretrain", *map(str, args), "--preset", "tiny", "--patch", "32", "--batch", "2", "--steps", "2",
                 "--val-every", "0", "--warmup", "0", "--device", "cpu", "--quiet"])


def test_empty_folder_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(tmp_path / "empty", "--out", tmp_path / "m.pt") == 2
    assert "No images found" in capsys.readouterr().err


def test_missing_path_is_a_user_error(tmp_path, capsys):
    assert cli(tmp_path / "nowhere", "--out", tmp_path / "m.pt") == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_tissue_anywhere_is_a_user_error(tmp_path, capsys):
    (tmp_path / "glass").mkdir()
    for i in range(2):
        imsave(tmp_path / "glass" / f"blank{i}.png", np.full((96, 96, 3), 245, np.uint8), check_contrast=False)
    assert cli(tmp_path / "glass", "--out", tmp_path / "m.pt") == 2
    assert "No tissue" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_patch_larger_than_every_image_is_a_user_error(slides, tmp_path, capsys):
    assert main(["pretrain", str(slides), "--out", str(tmp_path / "m.pt"), "--preset", "tiny", "--patch", "256",
                 "--steps", "1", "--device", "cpu", "--quiet"]) == 2
    assert "larger than every image" in capsys.readouterr().err


def test_resume_without_a_saved_run_is_a_user_error(slides, tmp_path, capsys):
    assert cli(slides, "--out", tmp_path / "m.pt", "--resume") == 2
    assert "Nothing to resume" in capsys.readouterr().err


def test_corrupt_files_are_skipped_by_name(tmp_path, capsys):
    folder = write_tissue(tmp_path / "mixed", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "truncated.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    assert cli(folder, "--out", tmp_path / "m.pt", "--val-fraction", "0") == 1  # trained, but inputs failed
    err = capsys.readouterr()
    assert "broken.png" in err.err and "truncated.tif" in err.err and "2 file(s) skipped" in err.out
    assert load_model(tmp_path / "m.pt", "cpu").kind == "pretrained"
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.png").write_bytes(b"garbage")
    assert cli(only_bad, "--out", tmp_path / "n.pt") == 2
    assert "broken.png could not be read" in capsys.readouterr().err


# --- the data stream --------------------------------------------------------------------

def test_stream_is_deterministic_and_independent_of_workers(slides):
    plan = plan_data([slides], 32, Resolution(), seed=3)
    kw = dict(seed=3, exclude=plan.exclude, bad=plan.bad)
    ref = PatchStream(plan.files, plan.train, 32, 4, Resolution(), **kw)
    assert ref._cache is None  # nothing opened until the first batch
    expect = [ref.batch_at(i)[0] for i in range(6)]
    loader = torch.utils.data.DataLoader(PatchStream(plan.files, plan.train, 32, 4, Resolution(), start=2, **kw),
                                         batch_size=None, num_workers=2)
    got = [b.numpy() for (b, _), _ in zip(loader, range(4))]
    assert all(np.array_equal(e, g) for e, g in zip(expect[2:], got))
    other_rank = PatchStream(plan.files, plan.train, 32, 4, Resolution(), rank=1, **kw).batch_at(2)[0]
    assert not np.array_equal(other_rank, expect[2])


def test_a_slide_failing_mid_stream_is_skipped(slides, monkeypatch):
    plan = plan_data([slides], 32, Resolution(), val_fraction=0)
    broken = plan.files[plan.train[0]]
    real = OpenSlide.read_window

    def read(self, w):
        if self.slide.path == broken:
            raise OSError("corrupt tile")
        return real(self, w)

    monkeypatch.setattr(OpenSlide, "read_window", read)
    stream = PatchStream(plan.files, plan.train, 32, 4, Resolution())
    reported = [s for i in range(3) for s in stream.batch_at(i)[1]]
    assert reported == [(str(broken), "could not be read: OSError: corrupt tile")]
    assert stream.batch_at(3)[0].shape == (4, 32, 32, 3)


def test_patches_come_from_tissue(tmp_path):
    rgb, _ = synthetic_tissue((128, 256), seed=5, glass=0.0)
    rgb[:, 128:] = 246  # right half is glass
    imsave(tmp_path / "half.png", rgb, check_contrast=False)
    plan = plan_data([tmp_path], 32, Resolution(), val_fraction=0)
    stream = PatchStream(plan.files, plan.train, 32, 8, Resolution())
    for i in range(5):
        for patch in stream.batch_at(i)[0]:
            assert tissue_mask(patch).mean() > 0.3


def test_folder_is_not_opened_up_front(tmp_path):
    write_tissue(tmp_path, 12, side=64)
    plan = plan_data([tmp_path], 32, Resolution(), val_patches=4)
    # One training file to check that training can start, one held-out file for validation.
    assert len(plan.files) == 12 and plan.opened == 2
    assert plan.validation == "held-out files" and len(plan.train) == 11
    val_file = {w.file for w in plan.val_windows}
    assert len(val_file) == 1 and not val_file & set(plan.train)


def test_single_file_holds_out_regions(tmp_path):
    rgb, _ = synthetic_tissue((256, 256), seed=2, glass=0.1)
    imsave(tmp_path / "one.png", rgb, check_contrast=False)
    plan = plan_data([tmp_path / "one.png"], 32, Resolution(), val_patches=8)
    assert plan.validation == "held-out regions" and plan.train == [0]
    held = plan.exclude[0]
    assert len(held) == len(plan.val_windows) > 0
    s = OpenSlide(plan.files[0], 32, Resolution())
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = s.random_window(0, rng, held)
        assert not any(w.overlaps(h) for h in held)


def test_resolution_by_microns_per_pixel(synthetic_slide):
    path, _, _ = synthetic_slide  # 1024 px at 0.5 µm/px, pyramid 1024-512-256
    exact = OpenSlide(path, 32, Resolution(mpp=1.0))
    assert (exact.level, exact.read) == (1, 32)
    between = OpenSlide(path, 32, Resolution(mpp=0.75))  # read 48 px at level 0, shrink to 32
    assert (between.level, between.read) == (0, 48)
    w = between.random_window(0, np.random.default_rng(0))
    assert between.read_window(w).shape == (32, 32, 3)
    assert OpenSlide(path, 32, Resolution(level=2)).level == 2
    with pytest.raises(UserError, match="larger than every image"):
        plan_data([path], 512, Resolution(level=2))


def test_auto_preset_is_resolved_and_recorded_in_the_checkpoint(slides, tmp_path, monkeypatch):
    from genselfdiff.nn import config
    from genselfdiff.nn.config import get_preset

    monkeypatch.setattr(config, "CPU_AUTO_PRESET", "small")  # not the tiny default, so it must be followed
    cfg = PretrainConfig.from_preset("auto", steps=1, val_every=0, **TINY)
    out = tmp_path / "auto.pt"
    pretrain([slides], out, cfg, device="cpu")
    saved = load_checkpoint(out)
    assert saved["config"]["preset"] == "small" and saved["net"]["width"] == get_preset("small").net.width


def test_resume_keeps_the_settings_of_the_run_and_says_which_choices_it_leaves_out(slides, tmp_path, monkeypatch,
                                                                                   capsys):
    """An fp32 official-recipe run resumed without repeating --recipe official stays in fp32 (bf16
    is not the run's to switch on); a choice against the run's settings is left out, in one line."""
    import warnings

    from genselfdiff.nn import model as model_module

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)  # so bf16 would run if asked
    official = dict(recipe="official", val_every=2, **TINY)
    straight = tmp_path / "straight.pt"
    pretrain([slides], straight, PretrainConfig.from_preset("tiny", steps=4, **official), device="cpu")
    out = tmp_path / "resumed.pt"
    pretrain([slides], out, PretrainConfig.from_preset("tiny", steps=2, **official), device="cpu")
    # What `genselfdiff pretrain SLIDES --out resumed.pt --resume --steps 4` asks for: no recipe, no --amp.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain([slides], out, PretrainConfig.from_preset("auto", steps=4), device="cpu", resume=True)
    assert not [w for w in caught if "Resuming" in str(w.message)]  # nothing was chosen against the run
    a, b = load_checkpoint(last_path(straight)), load_checkpoint(last_path(out))
    assert b["config"]["amp"] is False and b["config"]["recipe"] == "official" and b["step"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

    capsys.readouterr()
    assert main(["pretrain", str(slides), "--out", str(out), "--resume", "--steps", "5", "--preset", "tiny",
                 "--recipe", "official", "--amp", "--lr", "0.001", "--device", "cpu", "--quiet"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "Resuming" in line]
    assert said == [f"genselfdiff: warning: Resuming {last_path(out)} with the settings it was started with: "
                    "lr 0.0001 (not 0.001); amp off (not on). Start a new run to train with other settings."]
    resumed = load_checkpoint(last_path(out))
    assert resumed["step"] == 5 and resumed["config"]["amp"] is False and resumed["config"]["lr"] == 1e-4
