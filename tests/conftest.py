"""Fixtures several test modules share."""

from __future__ import annotations

from pathlib import Path

import pytest

from cavga.cli import main
from cavga.data import make_demo_data

TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished CAVGA-Du run (32 px, 2 steps, default map) on tiny demo data: brick with 12
    training images, 5 normal and 2 × 5 anomalous test images. Tests may add files to it (metrics,
    exports elsewhere) but must not change its checkpoint."""
    data = make_demo_data(
        tmp_path_factory.mktemp("tiny-demo"), seed=0, image_size=TINY_SIZE, n_train=12, n_test_good=5,
        n_test_defect=2, categories=("brick",),
    )  # fmt: skip
    run = tmp_path_factory.mktemp("tiny-runs") / "run"
    settings = ["--model", "cavga-du", "--image-size", str(TINY_SIZE), "--steps", "2", "--batch-size", "4"]
    assert (
        main(["train", "--data", str(data), *settings, "--out", str(run), "--quiet", "--device", "cpu"]) == 0
    )
    return run
