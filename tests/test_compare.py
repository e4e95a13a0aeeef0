"""`cavga compare` on tiny data: one table row per model and map, resumable, with a figure."""

from __future__ import annotations

import csv
from pathlib import Path

from cavga.cli import main
from cavga.data import make_demo_data
from cavga.engine import train as train_mod
from cavga.maps import MAPS


def test_compare_writes_tables_and_figure_and_reuses_finished_runs(tmp_path: Path, monkeypatch) -> None:
    """Two seeds of CAVGA-Du and AE-SSIM: each model's own map, its default map and the image-independent
    reference get a row with mean ± std; a second call recomputes nothing, and can tabulate every map."""
    data = make_demo_data(
        tmp_path / "data", image_size=32, n_train=10, n_test_good=3, n_test_defect=1, categories=("brick",)
    )
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--data",
        str(data),
        "--models",
        "cavga-du,ae-ssim",
        "--image-size",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["model"], r["map"]) for r in rows] == [
        ("cavga-du", "paper"),
        ("cavga-du", "memory"),
        ("cavga-du", "image-independent"),
        ("ae-ssim", "paper"),  # the baselines' default map is their own
        ("ae-ssim", "image-independent"),
    ]
    for r in rows:
        assert 0.0 <= float(r["pixel_auroc"]) <= 1.0 and float(r["pixel_auroc_std"]) >= 0.0
    assert "± " in (out / "compare.md").read_text()
    assert (out / "maps.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "runs" / "cavga-du" / "brick").iterdir()) == ["seed0", "seed1"]

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_mod, "train_step", no_training)
    assert main(args) == 0
    assert main([*args, "--maps", "all"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    du = [r["map"] for r in rows if r["model"] == "cavga-du"]
    ssim = [r["map"] for r in rows if r["model"] == "ae-ssim"]
    assert du == [*MAPS, "image-independent"]
    assert ssim == [m for m in MAPS if m != "gradcam-kl"] + ["image-independent"]  # no KL in a plain AE
