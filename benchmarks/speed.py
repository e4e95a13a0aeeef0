"""How fast cavga trains and infers on this machine, against what the machine can do.

    python benchmarks/speed.py                      # cavga-ru and cavga-du at 128 and 256 px
    python benchmarks/speed.py --models cavga-ru --sizes 128 --steps 3

One run measures:
- the machine's fp32 matrix-multiply rate (the best of several 2048 × 2048 products, all threads);
- each model's FLOPs per image (`torch.utils.flop_counter`), for a training step (both players of the
  adversarial game, the Grad-CAM of L_ae and its double backward) and for inference as `cavga
  predict` runs it (the encoder stages the default map reads, and its nearest-neighbour search);
- training and inference images/s, and the share of the machine's rate they reach;
- calibration time against one inference pass over the same images;
- the time `cavga test` spends on metrics for 200 images of 256 px (every map it reports).

Images are random (speed does not depend on content) and held in memory, so decoding is not
measured. Not a test: nothing here asserts; it prints a table (and --json writes one).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cavga.config import make_config
from cavga.engine.run import build_model
from cavga.engine.train import train_step
from cavga.maps import MapMaker, calibrate, cheap_maps
from cavga.metrics import summarize_maps


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n × n matrix product."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(model_name: str, size: int, batch: int, steps: int, device: torch.device, rate: float) -> dict:
    cfg = make_config("default", model=model_name, image_size=size, batch_size=batch, channels=3)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.d_lr, betas=cfg.betas)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    model.train()

    def step() -> None:
        train_step(model, x, y, cfg, opt_g, opt_d, adversarial=True)

    train_flops = _flops(step) / batch
    train_s = _timed(step, steps, device)

    # Inference as `cavga predict` runs it: the default map, calibrated on a few images.
    normal = torch.rand(4 * batch, 3, size, size)
    cal_s = time.perf_counter()
    calibration = calibrate(model, cfg, normal, normal[:batch], device, cheap_maps(cfg))
    cal_s = time.perf_counter() - cal_s
    maker = MapMaker(model, cfg, calibration, device, (cfg.anomaly_map,), attention=False, outputs=False)
    infer_flops = _flops(lambda: maker(x)) / batch
    infer_s = _timed(lambda: maker(x), steps, device)
    # One inference pass over the calibration's training images, every map calibration fits.
    full = MapMaker(model, cfg, calibration, device, maps=cheap_maps(cfg))
    pass_s = time.perf_counter()
    for i in range(0, len(normal), batch):
        full(normal[i : i + batch])
    pass_s = time.perf_counter() - pass_s
    return {
        "model": model_name,
        "image_size": size,
        "batch_size": batch,
        "train_gflop_per_image": train_flops / 1e9,
        "train_images_per_s": batch / train_s,
        "train_share_of_machine": train_flops * batch / train_s / rate,
        "infer_gflop_per_image": infer_flops / 1e9,
        "infer_images_per_s": batch / infer_s,
        "infer_share_of_machine": infer_flops * batch / infer_s / rate,
        "calibration_s": cal_s,
        "inference_pass_s": pass_s,
        "calibration_images": len(normal) + batch,
    }


def metrics_seconds(n: int = 200, size: int = 256, maps: int = 7) -> float:
    """Seconds `summarize_maps` (what `cavga test` calls) takes for `maps` maps of n images (half
    anomalous, three defect types)."""
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), np.float32)
    labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    types = ["good"] * (n // 2) + [f"type{i % 3}" for i in range(n - n // 2)]
    for i in range(n // 2, n):
        r, c = rng.integers(0, size - 40, 2)
        masks[i, r : r + rng.integers(5, 40), c : c + rng.integers(5, 40)] = 1
    jobs = {}
    for k in range(maps):
        m = rng.random((n, size, size), dtype=np.float32) * 0.6 + 0.3 * masks
        jobs[f"map{k}"] = (m, m.max((1, 2)))
    t = time.perf_counter()
    summarize_maps(jobs, masks, labels, types)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cavga-ru,cavga-du")
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed repeats of each measurement (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"machine: {where}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rate = matmul_rate(device)
    print(f"fp32 matrix multiply (2048²): {rate / 1e9:.1f} GFLOP/s")
    rows = [
        measure(m, int(s), args.batch_size, args.steps, device, rate)
        for m in args.models.split(",")
        for s in args.sizes.split(",")
    ]
    head = (
        f"{'model':<10}{'px':>5}{'batch':>6}{'train GF/img':>13}{'img/s':>8}{'share':>7}"
        f"{'infer GF/img':>13}{'img/s':>8}{'share':>7}{'calib s':>9}{'1 pass s':>9}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['model']:<10}{r['image_size']:>5}{r['batch_size']:>6}{r['train_gflop_per_image']:>13.2f}"
            f"{r['train_images_per_s']:>8.2f}{r['train_share_of_machine']:>7.0%}"
            f"{r['infer_gflop_per_image']:>13.2f}{r['infer_images_per_s']:>8.2f}"
            f"{r['infer_share_of_machine']:>7.0%}{r['calibration_s']:>9.2f}{r['inference_pass_s']:>9.2f}"
        )
    seconds = metrics_seconds()
    print(f"cavga test metrics, 7 maps (6 and the image-independent), 200 images of 256 px: {seconds:.2f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": where, "matmul_flops": rate, "rows": rows, "metrics_s": seconds}, indent=1)
        )


if __name__ == "__main__":
    main()
