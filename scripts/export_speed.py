"""Images/s of the PyTorch path and of onnxruntime on the same run, side by side.

    python scripts/export_speed.py --out /tmp/speed [--sizes 128,256] [--batches 1,16]

For each image size: a CAVGA-Ru run on the built-in demo data (1 training step: speed does not
depend on the weights), exported with `cavga export`; then the run's own map and score are timed
on random images through `Predictor` (PyTorch, no autograd) and through onnxruntime, at each batch
size, after a warm-up. Both use every core this machine gives them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from cavga.api import Predictor
from cavga.data import make_demo_data
from cavga.export import export_onnx


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def rate(fn, x: torch.Tensor, seconds: float) -> float:
    """Images per second of `fn(x)`, repeated for at least `seconds` after one warm-up call."""
    fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    args = p.parse_args()
    import onnxruntime as ort

    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}\n")  # fmt: skip
    print("| model, map | image size | batch | PyTorch images/s | onnxruntime images/s | ratio |")
    print("|---|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        data = args.out / f"data{size}"
        if not data.exists():
            make_demo_data(
                data, image_size=size, n_train=20, n_test_good=1, n_test_defect=1, categories=("brick",)
            )
        run = args.out / f"run{size}"
        if not (run / "checkpoint.pt").exists():
            train = [
                "train",
                "--data",
                str(data),
                "--image-size",
                str(size),
                "--steps",
                "1",
                "--out",
                str(run),
            ]
            subprocess.run([sys.executable, "-m", "cavga", *train, "--quiet"], check=True)
        onnx_path = run / "model.onnx"
        if not onnx_path.exists():
            export_onnx(run, onnx_path)
        predictor = Predictor(run, device="cpu")
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        for batch in map(int, args.batches.split(",")):
            x = torch.rand(batch, predictor.channels, size, size)
            a = rate(predictor._infer, x, args.seconds)
            b = rate(lambda t, s=session: s.run(None, {"images": t.numpy()}), x, args.seconds)
            what = f"{predictor.cfg.model}, {predictor.map_name}"
            print(f"| {what} | {size} | {batch} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
