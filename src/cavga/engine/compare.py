"""`cavga compare`: train and test several models on the same data and seeds, side by side.

Every (model, category, seed) run lives in `<out>/runs/<model>/<category>/seed<k>`; a finished
run is never recomputed and a stopped one is resumed, so an interrupted comparison continues
where it stopped. Results: `compare.csv`, `compare.md` (mean ± std over seeds of the per-seed mean
over categories, for the chosen maps of every model plus the image-independent reference of each
model's default map) and `maps.png` (one row per model and map for the same test images).

Maps are named as in `cavga.maps.MAPS`; "default" stands for each run's own `anomaly_map` and
"paper" for each model's map as its paper defines it, so one list fits CAVGA and the baselines.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cavga.config import make_config
from cavga.data import category_dir, list_categories, list_split, load_image, load_mask
from cavga.engine.evaluate import evaluate
from cavga.engine.run import CHECKPOINT, load_checkpoint, load_model, resolve_device
from cavga.engine.train import train
from cavga.errors import CavgaError
from cavga.maps import MAPS, MapMaker, costly
from cavga.networks import MODELS
from cavga.visualize import GT_COLOR, chw_to_image, draw_contour, overlay, save_grid

METRICS = ("pixel_auroc", "aupro", "pixel_iou", "image_auroc", "detection_accuracy")
REFERENCE = "image-independent"


def _run(out: Path, model: str, category: str, seed: int) -> Path:
    return out / "runs" / model / (category or "data") / f"seed{seed}"


def train_and_test(
    data: Path,
    category: str,
    model: str,
    seed: int,
    out: Path,
    overrides: dict[str, Any],
    progress: bool,
    all_maps: bool = False,
) -> dict[str, Any]:
    """One cell of the comparison: train (or resume, or reuse) and evaluate; returns metrics.json."""
    run = _run(out, model, category, seed)
    if (run / "metrics.json").exists():
        done = json.loads((run / "metrics.json").read_text())
        if done.get("all_maps") or not all_maps:
            return done
        return evaluate(run, panels=False, all_maps=True)  # trained, but tested without every map
    if (run / CHECKPOINT).exists():
        if load_checkpoint(run).get("calibration") is None:
            train(None, data, run, resume=True, progress=progress)
    else:
        cfg = make_config(overrides.pop("preset", "default"), model=model, seed=seed, **overrides)
        train(cfg, data, run, category=category or None, progress=progress)
    return evaluate(run, panels=False, all_maps=all_maps)


DEFAULT_MAPS = ("paper", "default")


def compare(
    data: str | Path,
    models: list[str],
    out: str | Path,
    categories: list[str] | None = None,
    seeds: int = 2,
    progress: bool = True,
    maps: tuple[str, ...] = DEFAULT_MAPS,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Run every model × category × seed, write the tables and the figure; returns the table rows.

    `maps`: which maps to tabulate and draw ("all" for every map a model makes).
    """
    data, out = Path(data), Path(out)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise CavgaError(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(MODELS)}")
    bad_maps = [m for m in maps if m not in (*MAPS, "default", "all")]
    if bad_maps:
        raise CavgaError(
            f"unknown map(s) {', '.join(bad_maps)}; choose from: default, all, {', '.join(MAPS)}"
        )
    categories = categories or list_categories(data)
    # The Grad-CAM variants cost a backward pass each: computed only when the table shows them.
    slow = "all" in maps or any(costly(m) for m in maps)
    cells = []
    total = len(models) * len(categories) * seeds
    for model in models:
        for seed in range(seeds):
            for cat in categories:
                print(f"[{len(cells) + 1}/{total}] {model} {cat or data.name} seed {seed}", flush=True)
                res = train_and_test(data, cat, model, seed, out, dict(overrides), progress, slow)
                summary = json.loads((_run(out, model, cat, seed) / "train_summary.json").read_text())
                cells.append({"model": model, "category": cat, "seed": seed, "result": res, "train": summary})
    rows = table_rows(cells, maps)
    write_tables(rows, cells, out)
    write_figure(cells, data, out, maps)
    return rows


def chosen_maps(result: dict[str, Any], maps: tuple[str, ...]) -> list[str]:
    """The maps of one run to show, in order, without repeats ("default" → the run's own map)."""
    if "all" in maps:
        return list(result["maps"])
    names = (result["anomaly_map"] if m == "default" else m for m in maps)
    return [n for n in dict.fromkeys(names) if n in result["maps"]]


def table_rows(cells: list[dict[str, Any]], maps: tuple[str, ...] = DEFAULT_MAPS) -> list[dict[str, Any]]:
    """One row per (model, map): mean and std over seeds of each seed's mean over categories."""
    rows = []
    for model in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == model]
        seeds = sorted({c["seed"] for c in mine})
        for name in [*chosen_maps(mine[0]["result"], maps), REFERENCE]:
            row: dict[str, Any] = {
                "model": model,
                "setting": MODELS[model].setting,
                "map": name,
                "default": name == mine[0]["result"]["anomaly_map"],
            }
            for k in METRICS:
                per_seed = []
                for s in seeds:
                    vals = [_metric(c["result"], name, k) for c in mine if c["seed"] == s]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        per_seed.append(float(np.mean(vals)))
                row[k] = float(np.mean(per_seed)) if per_seed else None
                row[f"{k}_std"] = float(np.std(per_seed)) if per_seed else None
            row["train_seconds"] = float(np.mean([c["train"]["train_seconds"] for c in mine]))
            rows.append(row)
    return rows


def _metric(result: dict[str, Any], name: str, key: str) -> float | None:
    block = result["references"][REFERENCE] if name == REFERENCE else result["maps"][name]
    return block["overall"][key]


def write_tables(rows: list[dict[str, Any]], cells: list[dict[str, Any]], out: Path) -> None:
    """compare.csv (every number) and compare.md (mean ± std, the machine and settings stated)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    t = cells[0]["train"]
    pretrained = ""
    if t.get("pretrain_step"):
        # Each run keeps its pre-trained stages only where pre-training learned (`pretrain.kept`).
        kept = sum(bool(c["train"].get("pretrain_kept", True)) for c in cells)
        pretrained = f" after {t['pretrain_step']} pre-training steps (kept in {kept} of {len(cells)} runs)"
    lines = [
        f"{len({c['seed'] for c in cells})} seeds × {len({c['category'] for c in cells})} categories; "
        f"{t['image_size']} px, batch {t['batch_size']}, {t['steps']} steps{pretrained}; "
        f"device {t['device']}, {torch.get_num_threads()} CPU threads. `*` marks each model's default map.",
        "",
        "| model | map | " + " | ".join(METRICS) + " | train s/run |",
        "|---|---|" + "---|" * (len(METRICS) + 1),
    ]
    for r in rows:
        cells_txt = [("n/a" if r[k] is None else f"{r[k]:.3f} ± {r[f'{k}_std']:.3f}") for k in METRICS]
        name = r["map"] + (" *" if r["default"] else "")
        lines.append(f"| {r['model']} | {name} | " + " | ".join(cells_txt) + f" | {r['train_seconds']:.0f} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")


def write_figure(
    cells: list[dict[str, Any]], data: Path, out: Path, maps: tuple[str, ...] = DEFAULT_MAPS
) -> None:
    """maps.png: the first category, seed 0: the first test image of each defect type, with the
    ground-truth contour, then one row per model and map."""
    cat = cells[0]["category"]
    samples = [s for s in list_split(category_dir(data, cat or None), "test") if s.label]
    picked = {s.defect_type: s for s in reversed(samples)}  # first image of each type
    picked = list(picked.values())[::-1][:6] if picked else []
    if not picked:
        return
    rows: list[tuple[str, list[np.ndarray]]] = []
    for model in dict.fromkeys(c["model"] for c in cells):
        run = _run(out, model, cat, 0)
        if not (run / CHECKPOINT).exists():
            continue
        ckpt, device = load_checkpoint(run), resolve_device("auto")
        net, cfg = load_model(ckpt, device)
        x = torch.stack([load_image(s.path, cfg.image_size, cfg.channels) for s in picked])
        result = next(c["result"] for c in cells if c["model"] == model and c["seed"] == 0)
        names = chosen_maps(result, maps)
        made = MapMaker(net, cfg, ckpt["calibration"], device, maps=tuple(names))(x)
        images = [chw_to_image(im.numpy()) for im in x]
        if not rows:
            inputs = []
            for s, im in zip(picked, images, strict=True):
                rgb = overlay(im, np.zeros(im.shape[:2]), alpha=0.0)
                mask = load_mask(s.mask_path, s.path, cfg.image_size)[0].numpy() if s.mask_path else None
                inputs.append(draw_contour(rgb, mask, GT_COLOR) if mask is not None else rgb)
            rows.append(("input + truth", inputs))
        for name in names:
            rows.append(
                (f"{model} {name}", [overlay(im, made[name][i].cpu().numpy()) for i, im in enumerate(images)])
            )
    if rows:
        save_grid(
            out / "maps.png", rows, title=f"{cat or data.name}: " + ", ".join(s.defect_type for s in picked)
        )


def parse_list(text: str | None) -> list[str] | None:
    """ "a,b" → ["a", "b"]; None stays None."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CavgaError(f"empty list: {text!r}")
    return items
