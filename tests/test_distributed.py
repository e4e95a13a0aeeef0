"""Several processes, one run: torchrun with gloo on CPUs, against one process with the same global
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cavga.cli import main
from cavga.config import TrainConfig, make_config
from cavga.engine.run import load_checkpoint
from cavga.maps.calibration import fit_normal_states
from cavga.maps.memory import nearest_distance
from cavga.networks import CAVGA, create_model
from tiny_data import small_demo

SIZE = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FITTED_MAPS = ("memory", "latent-stats")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_demo(tmp_path_factory.mktemp("ddp-data"), seed=1, category="brick")


def _args(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "train", "--data", str(data), "--model", "cavga-ru", "--image-size", str(SIZE), "--steps",
        str(steps), "--batch-size", "4", "--checkpoint-every", "1", "--device", "cpu", "--workers", "0",
        "--quiet", "--out", str(out),
    ]  # fmt: skip


def _weights(run: Path) -> torch.Tensor:
    model = load_checkpoint(run)["model"]
    return torch.cat([v.flatten() for k, v in model.items() if v.is_floating_point() and "running" not in k])


def test_two_processes_train_what_one_process_trains(data, tmp_path) -> None:
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv = [*torchrun, "-m", "cavga", *_args(data, two, 1)]
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone wrote the run: one checkpoint, one log with one row per step.
    files = ["checkpoint.pt", "config.json", "log.csv", "train_summary.json"]
    assert sorted(p.name for p in two.iterdir()) == files
    assert [ln.split(",")[0] for ln in (two / "log.csv").read_text().splitlines()] == ["step", "1"]
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 4
    assert load_checkpoint(two)["calibration"] is not None

    # One process, the same global batch of 4: the same weights up to float rounding. Adam's first
    # step moves every weight by about ±lr whatever its gradient's size, so the few weights whose
    # gradient is near zero take the sign rounding gives them; all others agree to 1e-6.
    assert main(_args(data, tmp_path / "one", 1)) == 0
    differ = (_weights(two) - _weights(tmp_path / "one")).abs() > 1e-6
    assert differ.float().mean() < 0.01, float(differ.float().mean())

    # One process resumes the two-process run to more steps.
    assert main(["train", "--out", str(two), "--resume", "--steps", "2", "--quiet", "--workers", "0"]) == 0
    assert load_checkpoint(two)["step"] == 2
    assert [ln.split(",")[0] for ln in (two / "log.csv").read_text().splitlines()] == ["step", "1", "2"]
    assert json.loads((two / "train_summary.json").read_text())["world_size"] == 1


def _bn_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from cavga.engine.distributed import SyncedBatchNorm2d

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    weights = torch.arange(4.0).view(4, 1, 1, 1)  # a loss that weighs the images differently
    ref, synced = nn.BatchNorm2d(3), SyncedBatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_()
        synced.weight.copy_(ref.weight)
    whole = x.clone().requires_grad_()
    y = ref(whole)
    (y * weights).sum().backward()
    part = x[rank::2].clone().requires_grad_()
    y_part = synced(part)
    (y_part * weights[rank::2]).sum().backward()
    results.put(
        max(
            float((y_part - y[rank::2]).abs().max()),
            float((part.grad - whole.grad[rank::2]).abs().max()),
            float((synced.running_var - ref.running_var).abs().max()),
            float((synced.running_mean - ref.running_mean).abs().max()),
        )
    )
    dist.destroy_process_group()


def test_synced_batchnorm_is_the_global_batchs_batchnorm() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = 29_500 + os.getpid() % 1000
    procs = [ctx.Process(target=_bn_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert max(results.get() for _ in range(2)) < 1e-5


def _fit_case() -> tuple[TrainConfig, CAVGA, torch.Tensor]:
    # Every position a memory candidate and kept (no coreset), so one process and two keep the same set.
    everything = 10**6
    cfg = make_config(
        model="cavga-ru", image_size=SIZE, channels=1, batch_size=2,
        memory_candidates=everything, coreset_size=everything,
    )  # fmt: skip
    torch.manual_seed(0)
    model = create_model("cavga-ru", SIZE, 1).eval()
    images = torch.rand(7, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return cfg, model, images


def _fit_rank(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg, model, images = _fit_case()
    fitted = fit_normal_states(model, cfg, images, torch.device("cpu"), FITTED_MAPS, rank, 2)
    if rank == 0:
        torch.save(fitted, path)
    else:
        assert fitted is None
    dist.destroy_process_group()


def test_two_processes_fit_the_normal_states_one_process_fits(tmp_path) -> None:
    """Calibration's pass over the training images split across two ranks (4 and 3 of 7 images):
    rank 0 merges what both fitted into the states one process fits from all 7, up to the order of
    the memory's rows and float rounding; the other rank gets None."""
    ctx = mp.get_context("spawn")
    port = 29_500 + (os.getpid() + 500) % 1000
    path = tmp_path / "fitted.pt"
    procs = [ctx.Process(target=_fit_rank, args=(r, port, str(path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    two = torch.load(path)
    cfg, model, images = _fit_case()
    one = fit_normal_states(model, cfg, images, torch.device("cpu"), FITTED_MAPS)

    for name, s in one["latent-stats"].items():
        # The ranks batch the images differently, so the features differ by float rounding, which the
        # precision matrix (an inverse) magnifies: compared against its largest entry.
        torch.testing.assert_close(two["latent-stats"][name]["mean"], s["mean"], rtol=1e-5, atol=1e-6)
        scale = float(s["precision"].abs().max())
        torch.testing.assert_close(
            two["latent-stats"][name]["precision"], s["precision"], rtol=0, atol=1e-4 * scale
        )
    a, b = one["memory"]["bank"], two["memory"]["bank"]
    assert a.shape == b.shape and one["memory"]["n_candidates"] == two["memory"]["n_candidates"]
    assert nearest_distance(a, b)[0].max() < 1e-4 and nearest_distance(b, a)[0].max() < 1e-4
    m1, m2 = one["image-memory"], two["image-memory"]
    assert nearest_distance(m1["bank"], m2["bank"])[0].max() < 1e-4 and len(m1["bank"]) == len(m2["bank"])
    for x, y in zip(m1["mean"] + m1["scale"], m2["mean"] + m2["scale"], strict=True):
        torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-5, atol=1e-6)
