"""Learned behaviour at the demo's settings (slow: about 2 minutes; run with `pytest -m slow`)."""

from __future__ import annotations

import pytest

from cavga.cli import DEMO_SIZE, demo_config
from cavga.data import make_demo_data
from cavga.engine.evaluate import evaluate
from cavga.engine.train import train


@pytest.mark.slow
def test_default_map_localises_on_demo_data(tmp_path) -> None:
    """After the demo's training budget, the default map localises the brick defects: pixel AUROC
    of at least 0.85, above the residual and above the image-independent reference map."""
    root = make_demo_data(tmp_path / "data", seed=0, image_size=DEMO_SIZE, categories=("brick",))
    cfg = demo_config(device="cpu")
    run = train(cfg, root, tmp_path / "run", category="brick", progress=False)
    res = evaluate(run, panels=False, device="cpu")
    auroc = res["pixel_auroc"]
    assert auroc >= 0.85
    assert auroc >= res["references"]["residual"]["overall"]["pixel_auroc"] + 0.05
    assert auroc >= res["references"]["image-independent"]["overall"]["pixel_auroc"] + 0.05
