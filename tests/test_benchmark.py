"""`cavga benchmark` end to end on tiny MNIST files: paper-like tables, published figures beside ours,
and a benchmark killed part way that resumes to the same table; and on a tiny ELPV folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cavga.cli import main
from cavga.engine import benchmark as bench_mod
from cavga.engine import train as train_mod
from test_protocols import write_elpv, write_mnist

CELLS = "0-zero,1-one,2-two,3-three"


def _args(data: Path, out: Path) -> list[str]:
    return [
        "benchmark", "--protocol", "mnist", "--data", str(data), "--models", "cavga-du",
        "--category", CELLS, "--image-size", "32", "--steps", "2", "--batch-size", "4",
        "--device", "cpu", "--out", str(out), "--quiet",
    ]  # fmt: skip


def _table(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "benchmark.csv").open()))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, per_class=(8, 3))
    return root


@pytest.fixture(scope="module")
def reference(mnist: Path, tmp_path_factory) -> Path:
    """An uninterrupted benchmark."""
    out = tmp_path_factory.mktemp("ref")
    assert main(_args(mnist, out)) == 0
    return out


def test_tables_per_cell_with_a_mean_row(reference: Path) -> None:
    rows = _table(reference)
    assert [r["cell"] for r in rows] == [*CELLS.split(","), "mean"]
    assert {r["metric"] for r in rows} == {"image_auroc"} and {r["model"] for r in rows} == {"cavga-du"}
    values = [float(r["value"]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[-1] == pytest.approx(sum(values[:-1]) / 4)
    md = (reference / "benchmark.md").read_text()
    assert "## image_auroc" in md and "| **mean** |" in md and "| 0-zero |" in md
    result = json.loads((reference / "results" / "cavga-du" / "0-zero.json").read_text())
    assert result["n_test_images"] == 30  # the whole test split: 3 of each digit


def test_published_figures_appear_beside_ours_with_their_source(reference: Path, monkeypatch, mnist) -> None:
    monkeypatch.setitem(
        bench_mod.PUBLISHED, ("mnist", "1-one", "cavga-du", "image_auroc"), (0.997, "Paper X, Table 7")
    )
    monkeypatch.setattr(
        train_mod, "train_step", lambda *a, **k: pytest.fail("a finished cell was recomputed")
    )
    assert main(_args(mnist, reference)) == 0
    row = next(r for r in _table(reference) if r["cell"] == "1-one")
    assert (row["published"], row["source"]) == ("0.997", "Paper X, Table 7")
    md = (reference / "benchmark.md").read_text()
    assert "(0.997 [1])" in md and "[1] Paper X, Table 7" in md


def test_killed_benchmark_resumes_to_the_same_table(mnist: Path, reference: Path, tmp_path: Path) -> None:
    """Kill the process as soon as its first cell is saved; rerunning finishes the rest and writes the
    table an uninterrupted run wrote."""
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "cavga", *_args(mnist, out)], env=env)
    first = out / "results" / "cavga-du" / "0-zero.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert first.exists(), "the first cell never finished"
    done = len(list((out / "results" / "cavga-du").glob("*.json")))
    assert done < 4, "the benchmark finished before it could be killed"
    assert not (out / "benchmark.csv").exists()
    assert main(_args(mnist, out)) == 0

    def values(rows: list[dict]) -> list[tuple]:  # the published column is another test's business
        return [(r["metric"], r["cell"], r["model"], r["value"], r["paper_map_value"]) for r in rows]

    assert values(_table(out)) == values(_table(reference))


def test_elpv_benchmark_has_a_row_per_module_type(tmp_path: Path) -> None:
    """ELPV from a folder in the package's layout (labels.csv + images/): cells mono and poly, image
    AUROC only; each cell tests its held-out normals and all its defective cells."""
    write_elpv(tmp_path / "elpv")
    out = tmp_path / "bench"
    args = [
        "benchmark", "--protocol", "elpv", "--data", str(tmp_path / "elpv"), "--models", "cavga-du",
        "--image-size", "32", "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", str(out),
        "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    rows = _table(out)
    assert [r["cell"] for r in rows] == ["mono", "poly", "mean"]
    assert {r["metric"] for r in rows} == {"image_auroc"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    for cell, n_test in (("mono", 2 + 3), ("poly", 1 + 2)):
        result = json.loads((out / "results" / "cavga-du" / f"{cell}.json").read_text())
        assert result["n_test_images"] == n_test


def test_a_protocol_default_size_applies_unless_one_is_given(tmp_path: Path, monkeypatch) -> None:
    """mnist5k's digits train at 64 px unless --image-size says otherwise; other protocols keep the
    models' default."""
    from cavga.data.protocols import MNIST5K_SIZE, Prepared

    seen: list[dict] = []

    def fake_cell(prepared, protocol, cell, model, seed, out, overrides, progress):
        seen.append(dict(overrides))
        score = {"image_auroc": 0.5}
        return {"model": model, "cell": cell, "seed": seed, "anomaly_map": "memory", "seconds": 1.0,
                "metrics": score, "paper_map": score}  # fmt: skip

    monkeypatch.setattr(bench_mod, "run_cell", fake_cell)
    for size in (MNIST5K_SIZE, None):
        monkeypatch.setattr(
            bench_mod, "prepare", lambda *a, s=size: Prepared(tmp_path, ["a"], "one-class", s)
        )
        for given in ({}, {"image_size": 32}):
            out = tmp_path / f"out{len(seen)}"
            bench_mod.benchmark("mnist5k", None, ["knn-pixels"], out, progress=False, **given)
    assert [s.get("image_size") for s in seen] == [MNIST5K_SIZE, 32, None, 32]
    assert "image_size 64" in (tmp_path / "out0" / "benchmark.md").read_text()
