"""Run files that cannot run code, clear lines for every broken run folder, hard kills survived
(SIGKILL at random moments, then the same command line with --resume), and numerical guards."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cavga.cli import main
from cavga.data import make_demo_data
from cavga.engine import run as run_mod
from cavga.engine import train as train_mod
from cavga.engine.run import CHECKPOINT, load_checkpoint
from cavga.errors import RunError

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(
        tmp_path_factory.mktemp("demo"), seed=0, image_size=SIZE, n_train=12, n_test_good=3, n_test_defect=1,
        categories=("brick",),
    )  # fmt: skip


def train_args(data: Path, out: Path, steps: int = 4, *extra: str) -> list[str]:
    size, common = str(SIZE), ["--batch-size", "4", "--quiet", "--device", "cpu"]
    return ["train", "--data", str(data), "--category", "brick", "--model", "cavga-du", "--image-size", size,
            "--steps", str(steps), "--out", str(out), *common, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "done"
    assert main(train_args(data, run, 2)) == 0
    return run


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


class RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_it(finished, tmp_path, capsys) -> None:
    run = copy_run(finished, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    torch.save({**ckpt, "calibration": RunsCode(marker)}, run / CHECKPOINT)
    assert main(["test", str(run), "--no-panels"]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "posix.system" in err and err.count("\n") == 1
    assert not marker.exists()
    with pytest.raises(RunError, match="refused"):  # the API path raises the same error
        load_checkpoint(run)


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "pickle-garbage", "empty", "newer", "other-model", "missing"]
)
def test_broken_run_folders_give_one_line(finished, data, tmp_path, capsys, damage: str) -> None:
    run = copy_run(finished, tmp_path / damage)
    path = run / CHECKPOINT
    raw = path.read_bytes()
    expected = {
        "truncated": "truncated or corrupt",
        "garbage": "truncated or corrupt",
        "pickle-garbage": "truncated or corrupt",
        "empty": "truncated or corrupt",
        "newer": "upgrade cavga",
        "other-model": "do not fit",
        "missing": "no checkpoint.pt",
    }[damage]
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "pickle-garbage":
        # An old-style pickle that stores into its memo from an empty stack: the unpickler fails
        # with an IndexError (random bytes sometimes do the same).
        path.write_bytes(b"\x80\x02q\x00" + bytes(100))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "newer":
        torch.save({**torch.load(path, weights_only=True), "format": run_mod.CHECKPOINT_FORMAT + 1}, path)
    elif damage == "other-model":
        other = tmp_path / "ru"
        assert main([*train_args(data, other, 1), "--model", "cavga-ru"]) == 0
        theirs = torch.load(other / CHECKPOINT, weights_only=True)
        torch.save({**torch.load(path, weights_only=True), "model": theirs["model"]}, path)
    else:
        path.unlink()
    capsys.readouterr()
    for argv in (
        ["test", str(run), "--no-panels"],
        ["predict", str(run), str(data), "--out", str(tmp_path / "p")],
        ["train", "--out", str(run), "--resume", "--quiet"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


def test_files_other_than_the_checkpoint_are_not_needed(finished, tmp_path) -> None:
    run = copy_run(finished, tmp_path / "bare")
    for name in ("config.json", "log.csv", "train_summary.json"):
        (run / name).unlink()
    assert main(["test", str(run), "--no-panels"]) == 0


def test_full_disk_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def filling_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint: half written, then the disk is full
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(run_mod.torch, "save", filling_save)
    assert main(train_args(data, run, 6, "--checkpoint-every", "2")) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "previous checkpoint.pt is intact" in err
    assert load_checkpoint(run)["step"] == 2
    assert not (run / (CHECKPOINT + ".tmp")).exists()


def test_nan_loss_stops_and_saves_nothing(data, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    real, calls = train_mod.reconstruction_loss, []

    def diverging(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(train_mod, "reconstruction_loss", diverging)
    assert main(train_args(data, run, 6, "--checkpoint-every", "2")) == 2
    err = capsys.readouterr().err
    assert "diverged at step 3/6" in err and f"{run / CHECKPOINT} (step 2)" in err
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 2 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )


def test_constant_training_images_keep_everything_finite(tmp_path) -> None:
    cat = tmp_path / "black"
    for split, n in (("train/good", 12), ("test/good", 2), ("test/spot", 2)):
        (cat / split).mkdir(parents=True)
        for i in range(n):
            a = np.zeros((SIZE, SIZE), np.uint8)
            if split == "test/spot":
                a[4:12, 4:12] = 200
            Image.fromarray(a).save(cat / split / f"{i:03d}.png")
    run = tmp_path / "run"
    assert main(["train", "--data", str(cat), "--image-size", str(SIZE), "--steps", "2", "--batch-size", "4",
                 "--out", str(run), "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    cal = load_checkpoint(run)["calibration"]
    assert all(np.isfinite(v) for v in cal["scales"].values())
    assert all(np.isfinite(v) for v in cal["image_thresholds"].values())
    assert main(["test", str(run), "--no-panels"]) == 0
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["image_auroc"] == 1.0  # the bright spot is found, nothing became NaN


def test_resume_starts_a_run_that_has_no_checkpoint_yet(data, tmp_path) -> None:
    """The same command line with --resume works before the first checkpoint (no folder, or a
    folder a killed first attempt left without one) and after the run finished."""
    fresh, early, full = tmp_path / "fresh", tmp_path / "early", tmp_path / "full"
    assert main(train_args(data, full, 3)) == 0
    assert main(train_args(data, fresh, 3, "--resume")) == 0
    early.mkdir()
    (early / "log.csv").write_text("step,loss\n1,0.5\n")  # what a first attempt killed early leaves
    (early / (CHECKPOINT + ".tmp")).write_bytes(b"PK half")
    assert main(train_args(data, early, 3, "--resume")) == 0
    before = (full / CHECKPOINT).stat().st_mtime_ns
    assert main(train_args(data, full, 3, "--resume")) == 0  # finished: nothing to do
    assert (full / CHECKPOINT).stat().st_mtime_ns == before
    ref = load_checkpoint(full)["model"]
    for run in (fresh, early):
        got = load_checkpoint(run)["model"]
        assert all(torch.equal(ref[k], got[k]) for k in ref)
        assert (run / "log.csv").read_text().count("\n") == 4  # header + 3 steps


def kill_and_resume(argv: list[str], delays: list[float], env: dict) -> int:
    """Start `cavga train ... --resume`, SIGKILL it after each delay, and after the last delay let
    it finish; returns how many attempts were killed before they ended."""
    killed = 0
    cmd = [sys.executable, "-m", "cavga", *argv, "--resume"]
    for delay in [*delays, None]:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if delay is not None:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        _, err = proc.communicate(timeout=600)
        assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 0, err.decode()
    return killed


def test_sigkill_at_random_moments_then_resume_gives_the_same_weights(data, tmp_path) -> None:
    steps = 6
    ref, run = tmp_path / "ref", tmp_path / "killed"
    # Same process settings for both runs: the thread count changes float summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert kill_and_resume(train_args(data, ref, steps, "--checkpoint-every", "1"), [], env) == 0
    rng = random.Random(0)
    # Python and torch take a few seconds to start: the early kills land before the first checkpoint.
    killed = kill_and_resume(
        train_args(data, run, steps, "--checkpoint-every", "1"), [rng.uniform(0.5, 8) for _ in range(3)], env
    )
    assert killed >= 1
    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert b["step"] == steps and b["calibration"] is not None
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (run / "log.csv").read_text().count("\n") == steps + 1
