"""`cavga report`: one self-contained HTML file about a tested run, pictures inlined.

It shows the run's settings and training curve (`log.csv`), the metrics of every map and of the
reference maps overall and per defect type (`metrics.json`), the image ROC, pixel ROC and PRO
curves (`curves.npz`), and the panels of the worst-scored normal images and of the best- and
worst-localised defects (`scores.csv`, `panels/`), all written by `cavga test`. matplotlib draws
the plots (``pip install 'cavga[report]'``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cavga import __version__
from cavga.engine.run import load_checkpoint
from cavga.errors import RunError, require

N_PANELS = 4  # panels per group
COLUMNS = ("pixel_auroc", "aupro", "pixel_iou", "image_auroc", "detection_accuracy")
SETTINGS = (
    "model",
    "image_size",
    "batch_size",
    "steps",
    "epochs",
    "lr",
    "anomaly_map",
    "image_score",
    "seed",
)


def _pyplot():
    require("matplotlib", "report", "`cavga report`").use("Agg")  # files only, no display
    return require("matplotlib.pyplot", "report", "`cavga report`")


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    fig.clf()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, css: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" class="{css}" src="data:image/png;base64,{b64}">'


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _setting(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _fmt(v)


def _table(rows: list[tuple[str, dict]], first: str) -> str:
    head = "".join(f"<th>{c}</th>" for c in (first, *COLUMNS))
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(m.get(c))}</td>" for c in COLUMNS) + "</tr>"
        for name, m in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _training_curve(plt, log: Path) -> str | None:
    if not log.is_file():
        return None
    with log.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    fig = plt.figure(figsize=(6.5, 3.2))
    steps = [int(r["step"]) for r in rows]
    for key in rows[0]:
        if key in ("step", "seconds"):
            continue
        values = [float(r[key]) for r in rows]
        if any(values):
            plt.plot(steps, values, label=key, linewidth=1)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.yscale("symlog", linthresh=1e-3)
    plt.legend(fontsize=7, ncol=4)
    plt.title("training losses")
    return _figure_png(fig)


def _curves(plt, path: Path) -> str | None:
    if not path.is_file():
        return None
    c = np.load(path)
    if not c.files:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for kind, label in (("image", "image ROC"), ("pixel", "pixel ROC")):
        if f"{kind}_fpr" in c:
            axes[0].plot(c[f"{kind}_fpr"], c[f"{kind}_tpr"], label=label)
    axes[0].plot([0, 1], [0, 1], ":", color="grey")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    axes[0].legend(fontsize=8)
    if "pro_fpr" in c:
        axes[1].plot(c["pro_fpr"], c["pro"])
        axes[1].axvline(0.3, ls=":", color="grey")  # AUPRO integrates up to FPR 0.3
        axes[1].set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="per-region overlap")
        axes[1].set_title("PRO (AUPRO up to FPR 0.3)")
    else:
        axes[1].set_axis_off()
        axes[1].text(0.5, 0.5, "no masks: no pixel curves", ha="center")
    return _figure_png(fig)


def _panel_groups(run: Path) -> list[tuple[str, list[dict]]]:
    path = run / "scores.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    normal = sorted((r for r in rows if r["label"] == "0"), key=lambda r: -float(r["score"]))
    located = sorted((r for r in rows if r["label"] == "1" and r["iou"]), key=lambda r: -float(r["iou"]))
    groups = [("Normal images with the highest scores (false alarms first)", normal[:N_PANELS])]
    if located:
        groups.append(("Best-localised defects (highest IoU)", located[:N_PANELS]))
        groups.append(("Worst-localised defects (lowest IoU)", located[::-1][:N_PANELS]))
    else:
        anomalous = sorted((r for r in rows if r["label"] == "1"), key=lambda r: float(r["score"]))
        groups.append(("Defects with the lowest scores (misses first)", anomalous[:N_PANELS]))
    return groups


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `out` (default `<run>/report.html`) for a run that `cavga test` has evaluated."""
    plt = _pyplot()
    run = Path(run_dir)
    ckpt = load_checkpoint(run)
    if not (run / "metrics.json").is_file():
        raise RunError(f"{run} has no metrics.json: evaluate it first with `cavga test {run}`")
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{run / 'metrics.json'} is not valid JSON ({e}); run `cavga test {run}` again") from e
    cfg, data = ckpt["config"], ckpt["data"]
    summary = {}
    if (run / "train_summary.json").is_file():
        summary = json.loads((run / "train_summary.json").read_text())
    chosen = metrics["anomaly_map"]
    rows = [(f"{n} (the run map)" if n == chosen else n, m["overall"]) for n, m in metrics["maps"].items()]
    rows += [(f"reference: {n}", m["overall"]) for n, m in metrics["references"].items()]
    # Per defect type: the run's map, then each reference map on the same images.
    per_type = []
    for t, m in metrics["per_type"].items():
        per_type.append((f"{t}: {chosen}", m))
        per_type += [
            (f"{t}: reference {n}", r["per_type"][t])
            for n, r in metrics["references"].items()
            if t in r["per_type"]
        ]
    settings = {k: cfg.get(k) for k in SETTINGS if cfg.get(k) is not None}
    settings.update(
        {
            "category": data.get("category_name"),
            "training images": len(data.get("train_files", [])),
            "held-out normal images": len(data.get("calib_files", [])),
            "skipped files": len(data.get("skipped_files") or []),
            "steps trained": ckpt["step"],
            "training seconds": summary.get("train_seconds"),
            "device": summary.get("device"),
            "test images": metrics.get("n_images"),
            "image threshold": metrics.get("image_threshold"),
        }
    )
    parts = [
        f"<h1>cavga report: {html.escape(run.name)}</h1>",
        f"<p class=small>{html.escape(str(metrics.get('model')))}, {html.escape(chosen)} map, "
        f"{html.escape(str(metrics.get('data')))}; cavga {__version__}</p>",
        "<h2>Settings</h2><table>"
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{_setting(v)}</td></tr>" for k, v in settings.items())
        + "</table>",
    ]
    curve = _training_curve(plt, run / "log.csv")
    parts.append(
        "<h2>Training</h2>" + (_img(curve, "training losses") if curve else "<p>No training steps.</p>")
    )
    parts.append("<h2>Metrics</h2>" + _table(rows, "map"))
    parts.append("<h3>Per defect type, beside the reference maps</h3>" + _table(per_type, "defect type: map"))
    plots = _curves(plt, run / "curves.npz")
    if plots:
        parts.append("<h2>Curves</h2>" + _img(plots, "ROC and PRO curves"))
    groups = _panel_groups(run)
    if groups:
        parts.append("<h2>Panels</h2><p class=small>input, reconstruction, attention, map, prediction (red) "
                     "and ground truth (green)</p>")  # fmt: skip
    for title, chosen_rows in groups:
        parts.append(f"<h3>{html.escape(title)}</h3>")
        for r in chosen_rows:
            panel = run / "panels" / r["panel"]
            what = f"{Path(r['file']).name} ({r['defect_type']}): score {float(r['score']):.4g}"
            what += f", IoU {float(r['iou']):.3f}" if r["iou"] else ""
            if panel.is_file():
                b64 = base64.b64encode(panel.read_bytes()).decode("ascii")
                parts.append(
                    f"<figure>{_img(b64, what, 'panel')}<figcaption>{html.escape(what)}</figcaption></figure>"
                )
            else:
                parts.append(f"<p>{html.escape(what)}: no panel (tested with --no-panels)</p>")
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>cavga report: {html.escape(run.name)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    path = Path(out) if out else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 64rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 0.5rem 0 1rem; } figcaption, .small { color: #555; font-size: 0.85rem; }
img.panel { max-width: 100%; }
"""
