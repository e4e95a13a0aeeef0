"""Fixtures several test modules share."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from cavga.cli import main
from tiny_data import TINY_SIZE, small_demo


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished CAVGA-Du run (32 px, 2 steps, default map) on tiny demo data: brick with 12
    training images, 5 normal and 2 × 5 anomalous test images. Tests may add files to it (metrics,
    exports elsewhere) but must not change its checkpoint."""
    data = small_demo(tmp_path_factory.mktemp("tiny-demo"))
    run = tmp_path_factory.mktemp("tiny-runs") / "run"
    settings = ["--model", "cavga-du", "--image-size", str(TINY_SIZE), "--steps", "2", "--batch-size", "4"]
    assert (
        main(["train", "--data", str(data), *settings, "--out", str(run), "--quiet", "--device", "cpu"]) == 0
    )
    return run


@pytest.fixture
def ctrl_c():
    """SIGINT as an interactive terminal has it (Python's handler), whatever the test runner inherited
    (a background job of a script ignores it); put back afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
