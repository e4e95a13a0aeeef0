"""Learning check: does the anomaly map localise on the demo data, and by how much beyond the
residual and an image-independent map? Trains CAVGA-Ru on every demo category for several seeds
at the demo's settings and writes a Markdown table (mean ± std over seeds) of every map.

    python benchmarks/learning_check.py --seeds 3 --out learning-check

Figures depend on the machine: the table states its image size, batch size, steps and the
training throughput measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from cavga.cli import DEMO_SIZE, DEMO_STEPS
from cavga.config import make_config
from cavga.data import make_demo_data
from cavga.engine.evaluate import evaluate
from cavga.engine.train import train

METRICS = ("pixel_auroc", "aupro", "pixel_iou", "image_auroc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=DEMO_STEPS)
    ap.add_argument("--image-size", type=int, default=DEMO_SIZE)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="learning-check")
    args = ap.parse_args()
    out = Path(args.out)
    rows: list[dict] = []
    results_path = out / "results.jsonl"
    done = (
        {(r["seed"], r["category"]) for r in map(json.loads, results_path.open())}
        if results_path.exists()
        else set()
    )
    for seed in range(args.seeds):
        root = make_demo_data(out / f"data-{seed}", seed=seed, image_size=args.image_size)
        for cat in sorted(p.name for p in root.iterdir() if p.is_dir()):
            if (seed, cat) in done:  # a stopped check resumes where it stopped
                continue
            run = out / f"run-{seed}-{cat}"
            cfg = make_config(
                args.preset, model="cavga-ru", image_size=args.image_size, steps=args.steps, seed=seed
            )
            train(cfg, root, run, category=cat, progress=False)
            res = evaluate(run, panels=False)
            summary = json.loads((run / "train_summary.json").read_text())
            row = {
                "seed": seed,
                "category": cat,
                "train_seconds": summary["train_seconds"],
                "images_per_second": summary["images_per_second"],
                "batch_size": summary["batch_size"],
            }
            maps = {**res["maps"], "image-independent": res["references"]["image-independent"]}
            for name, m in maps.items():
                for k in METRICS:
                    row[f"{name}/{k}"] = m["overall"][k]
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"seed {seed} {cat}: " + ", ".join(f"{n} {row[f'{n}/pixel_auroc']:.3f}" for n in maps),
                flush=True,
            )
    rows = [json.loads(line) for line in results_path.open()]
    (out / "table.md").write_text(table(rows, args))
    print(table(rows, args))


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown: one row per map, mean ± std over seeds of the per-seed mean over categories."""
    names = sorted({k.split("/")[0] for r in rows for k in r if "/" in k})
    seeds = sorted({r["seed"] for r in rows})
    cats = sorted({r["category"] for r in rows})
    lines = [
        f"Demo data, CAVGA-Ru ({args.preset} preset), {args.image_size} px, batch {rows[0]['batch_size']}, "
        f"{args.steps} steps per category, {len(seeds)} seeds × {len(cats)} categories; "
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"training {np.mean([r['images_per_second'] for r in rows]):.1f} images/s, "
        f"{np.mean([r['train_seconds'] for r in rows]):.0f} s per run.",
        "",
        "| map | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name in names:
        cells = []
        for k in METRICS:
            per_seed = [np.mean([r[f"{name}/{k}"] for r in rows if r["seed"] == s]) for s in seeds]
            cells.append(f"{np.mean(per_seed):.3f} ± {np.std(per_seed):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| map | " + " | ".join(sorted({r["category"] for r in rows})) + " | (pixel AUROC per category) |",
        "|---|" + "---|" * (len({r["category"] for r in rows}) + 1),
    ]
    for name in names:
        cats = sorted({r["category"] for r in rows})
        vals = [np.mean([r[f"{name}/pixel_auroc"] for r in rows if r["category"] == c]) for c in cats]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
