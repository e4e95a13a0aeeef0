"""Peak memory of training (calibration included) and prediction on a folder of many images.

    python benchmarks/memory.py --images 3000 --out /tmp/mem

Writes `--images` generated colour PNGs of `--file-size` px (smooth random textures, so they
compress like photographs rather than like noise) in the MVTec layout, then runs
`cavga train` for a few steps and `cavga predict` over the same folder under `/usr/bin/time -v`,
and prints each one's wall time and maximum resident set size. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = folder / f"{i:05d}.png"
        if path.exists():
            continue
        coarse = rng.random((size // 16, size // 16, 3)).astype(np.float32)
        im = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 8, (size, size, 3))
        Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8)).save(path)


def timed(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak resident memory in MB, and the exit code of a command."""
    t = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return wall, int(peak.group(1)) / 1024 if peak else float("nan"), done.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--file-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=128, help="the model's input size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    data = out / "data" / "many"
    make_images(data / "train" / "good", args.images, args.file_size)
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    cavga = [sys.executable, "-m", "cavga"]
    run = out / "run"
    train = [*cavga, "train", "--data", str(data), "--image-size", str(args.image_size), "--steps",
             str(args.steps), "--out", str(run), "--quiet", *workers]  # fmt: skip
    if not (run / "checkpoint.pt").exists():
        wall, peak, rc = timed(train)
        what = f"train ({args.steps} steps, calibration included)"
        print(f"{what}: {wall:.0f} s, peak RSS {peak:.0f} MB, rc {rc}")
    preds = out / "predictions"
    predict = [*cavga, "predict", str(run), str(data / "train" / "good"), "--out", str(preds), *workers]
    wall, peak, rc = timed(predict)
    with (preds / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    print(
        f"predict: {wall:.0f} s, peak RSS {peak:.0f} MB, rc {rc}; CSV rows {len(rows)} of {args.images}, "
        f"{sum(1 for r in rows if r['error'])} errors"
    )


if __name__ == "__main__":
    main()
