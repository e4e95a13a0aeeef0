"""`cavga benchmark`: every model on every category, scene or class of a paper dataset, laid out as
the paper's tables.

Each (model, cell) result is written to `<out>/results/<model>/<cell>.json` as soon as it is done;
a run stopped part way resumes from its checkpoint, and a finished cell is never recomputed. The
tables (`benchmark.csv`, `benchmark.md`) are rebuilt from those files at the end of every call.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cavga.data.protocols import PROTOCOLS, Prepared, prepare
from cavga.engine.compare import train_and_test
from cavga.engine.evaluate import METRIC_KEYS
from cavga.engine.run import write_json
from cavga.errors import CavgaError

METRICS = {"localisation": METRIC_KEYS, "one-class": ("image_auroc",)}

# Published figures shown beside ours: (protocol, cell, model, metric) → (value, source).
# Only figures the project can trace to a source it holds go here. Our copy of the CAVGA paper
# (shared/paper) lost its tables' cell alignment in text extraction, so none is entered yet; a figure
# read off the typeset paper belongs here with "Venkataramanan et al. 2020, Table N" as its source.
PUBLISHED: dict[tuple[str, str, str, str], tuple[float, str]] = {}


def _result_path(out: Path, model: str, cell: str) -> Path:
    return out / "results" / model / f"{cell}.json"


def run_cell(
    prepared: Prepared,
    protocol: str,
    cell: str,
    model: str,
    seed: int,
    out: Path,
    overrides: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Train and test one model on one cell; save and return its result."""
    t0 = time.perf_counter()
    metrics = train_and_test(prepared.root, cell, model, seed, out, dict(overrides), progress)
    keys = METRICS[prepared.kind]
    result = {
        "protocol": protocol,
        "cell": cell,
        "model": model,
        "seed": seed,
        "anomaly_map": metrics["anomaly_map"],
        "metrics": {k: metrics[k] for k in keys},
        "paper_map": {k: metrics["maps"]["paper"]["overall"][k] for k in keys},
        "n_test_images": metrics["n_images"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(_result_path(out, model, cell), result)
    return result


def benchmark(
    protocol: str,
    data: str | Path | None,
    models: list[str],
    out: str | Path,
    cells: list[str] | None = None,
    seed: int = 0,
    download: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Run every model on every cell (or the chosen `cells`), then write the tables.

    Returns the per-cell results in table order.
    """
    out = Path(out)
    if protocol not in PROTOCOLS:
        raise CavgaError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    prepared = prepare(protocol, data, out / "data", download)
    if prepared.image_size is not None and overrides.get("image_size") is None:
        overrides = {**overrides, "image_size": prepared.image_size}  # the protocol's own default
    chosen = prepared.cells if not cells or cells == ["all"] else cells
    unknown = [c for c in chosen if c not in prepared.cells]
    if unknown:
        raise CavgaError(f"{protocol} has no cell {', '.join(unknown)}; it has: {', '.join(prepared.cells)}")
    todo = [(m, c) for m in models for c in chosen]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for m, c in todo:
        path = _result_path(out, m, c)
        if path.is_file():
            results[(m, c)] = json.loads(path.read_text())
    # One bar for the whole benchmark; finished cells count as done, so its time left comes from
    # the cells computed in this call only.
    bar = tqdm(
        total=len(todo), initial=len(results), unit="cell", desc=f"benchmark {protocol}", disable=not progress
    )
    for m, c in todo:
        if (m, c) in results:
            continue
        bar.set_postfix_str(f"{m} {c}")
        r = run_cell(prepared, protocol, c, m, seed, out, overrides, progress)
        results[(m, c)] = r
        key = METRICS[prepared.kind][0]
        bar.write(f"{m} {c}: {key} {_fmt(r['metrics'][key])} ({r['seconds']:.0f} s)")
        bar.update(1)
    bar.close()
    ordered = [results[(m, c)] for m in models for c in chosen]
    write_tables(ordered, prepared.kind, protocol, out, overrides)
    return ordered


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def write_tables(
    results: list[dict[str, Any]], kind: str, protocol: str, out: Path, overrides: dict[str, Any]
) -> None:
    """benchmark.csv (one row per cell, model and metric, mean rows included) and benchmark.md (one
    table per metric: a row per cell and a mean row, a column per model, published figures beside)."""
    models = list(dict.fromkeys(r["model"] for r in results))
    cells = list(dict.fromkeys(r["cell"] for r in results))
    by = {(r["model"], r["cell"]): r for r in results}
    rows = []
    for metric in METRICS[kind]:
        for cell in [*cells, "mean"]:
            for m in models:
                if cell == "mean":
                    value = _mean([by[(m, c)]["metrics"][metric] for c in cells])
                    paper = _mean([by[(m, c)]["paper_map"][metric] for c in cells])
                else:
                    value, paper = by[(m, cell)]["metrics"][metric], by[(m, cell)]["paper_map"][metric]
                pub = PUBLISHED.get((protocol, cell, m, metric))
                rows.append(
                    {
                        "protocol": protocol,
                        "metric": metric,
                        "cell": cell,
                        "model": m,
                        "value": value,
                        "paper_map_value": paper,
                        "published": pub[0] if pub else None,
                        "source": pub[1] if pub else None,
                    }
                )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "benchmark.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    settings = ", ".join(f"{k} {v}" for k, v in sorted(overrides.items())) or "default settings"
    maps = ", ".join(sorted({f"{r['model']}: {r['anomaly_map']}" for r in results}))
    lines = [
        f"# {protocol}: {PROTOCOLS[protocol]}",
        "",
        f"{settings}; seed {results[0]['seed']}; {torch.get_num_threads()} CPU threads. Each model's "
        f"default map ({maps}); published figures, where known, in brackets with their source.",
    ]
    by_key = {(r["metric"], r["cell"], r["model"]): r for r in rows}
    sources: list[str] = []
    for metric in METRICS[kind]:
        lines += [
            "",
            f"## {metric}",
            "",
            "| " + " | ".join(["cell", *models]) + " |",
            "|---" * (len(models) + 1) + "|",
        ]
        for cell in [*cells, "mean"]:
            texts = []
            for m in models:
                row = by_key[(metric, cell, m)]
                text = _fmt(row["value"])
                if row["published"] is not None:
                    if row["source"] not in sources:
                        sources.append(row["source"])
                    text += f" ({row['published']:.3f} [{sources.index(row['source']) + 1}])"
                texts.append(text)
            name = f"**{cell}**" if cell == "mean" else cell
            lines.append("| " + " | ".join([name, *texts]) + " |")
    if sources:
        lines += ["", "Sources:"] + [f"[{i + 1}] {s}" for i, s in enumerate(sources)]
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
