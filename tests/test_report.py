"""`cavga report`: one self-contained HTML file with the run's metrics, curves and panels."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from cavga.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tested(tiny_run: Path) -> Path:
    assert main(["test", str(tiny_run), "--device", "cpu"]) == 0
    return tiny_run


def test_report_holds_the_metrics_curves_and_one_image_per_panel(tested: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(tested), "--out", str(out)]) == 0
    page = out.read_text()
    metrics = json.loads((tested / "metrics.json").read_text())
    for name, m in metrics["maps"].items():
        row = re.search(rf"<tr><td>{re.escape(name)}( \(the run map\))?</td>(.*?)</tr>", page)
        assert row, name
        cells = re.findall(r"<td>(.*?)</td>", row.group(2))
        assert (
            cells[0] == f"{m['overall']['pixel_auroc']:.3f}"
            and cells[3] == f"{m['overall']['image_auroc']:.3f}"
        )
    for ref in metrics["references"]:
        assert f"reference: {ref}" in page
    for defect, m in metrics["per_type"].items():
        row = re.search(rf"<tr><td>{defect}: memory</td>(.*?)</tr>", page)
        assert row and re.findall(r"<td>(.*?)</td>", row.group(1))[0] == f"{m['pixel_auroc']:.3f}"
        for ref in metrics["references"]:
            assert f"<td>{defect}: reference {ref}</td>" in page
    # Pictures: the training curve, the curves, and 4 + 4 + 4 panels, each one inlined image.
    images = re.findall(r'<img alt="([^"]*)" class="([^"]*)" src="data:image/png;base64,', page)
    panels = [alt for alt, css in images if css == "panel"]
    with (tested / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    normal = sorted((r for r in rows if r["label"] == "0"), key=lambda r: -float(r["score"]))[:4]
    located = sorted((r for r in rows if r["iou"]), key=lambda r: -float(r["iou"]))
    expected = [*normal, *located[:4], *located[::-1][:4]]
    assert [(p.split(" (")[0], p.split("(")[1].split(")")[0]) for p in panels] == [
        (Path(r["file"]).name, r["defect_type"]) for r in expected
    ]
    assert "training losses" in [alt for alt, _ in images] and "ROC and PRO curves" in [a for a, _ in images]
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # self-contained: nothing fetched


def test_report_before_test_says_what_to_do(tmp_path: Path, tested: Path, capsys) -> None:
    run = tmp_path / "untested"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((tested / "checkpoint.pt").read_bytes())
    assert main(["report", str(run)]) == 2
    assert "cavga test" in capsys.readouterr().err
