"""PyTorch against the exported ONNX graph on every test image of a run, at batch 1 and 8.

    python scripts/export_parity.py RUN [--onnx FILE]

Exports the run (unless --onnx names an existing export), then prints, per batch size, the largest
absolute difference of the calibrated maps and of the image scores, and how many image decisions
(score ≥ threshold) and pixel decisions (map ≥ 0.5) differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cavga.data import category_dir, list_split, load_image
from cavga.engine.run import load_checkpoint, load_model
from cavga.export import export_onnx, read_metadata
from cavga.maps import MapMaker


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--onnx", type=Path)
    args = p.parse_args()
    path = args.onnx if args.onnx and args.onnx.exists() else export_onnx(args.run, args.onnx)
    meta = read_metadata(path)
    ckpt = load_checkpoint(args.run)
    model, cfg = load_model(ckpt, torch.device("cpu"))
    name, threshold = meta["anomaly_map"], meta["threshold"]
    samples = list_split(category_dir(ckpt["data"]["root"], ckpt["data"]["category"]), "test")
    x = torch.stack([load_image(s.path, cfg.image_size, cfg.channels) for s in samples])
    maker = MapMaker(model, cfg, ckpt["calibration"], torch.device("cpu"), maps=(name,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    what = f"{cfg.model}, {name} map, {cfg.image_size} px"
    print(f"{args.run} ({what}): {len(x)} test images, threshold {threshold:.6g}")
    for batch in (1, 8):
        ref_m, ref_s, m, s = [], [], [], []
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            ref = maker(xb)
            ref_m.append(ref[name].numpy())
            ref_s.append(ref[f"score/{name}"].numpy())
            a, b = session.run(None, {"images": xb.numpy()})
            m.append(a)
            s.append(b)
        ref_m, ref_s, m, s = map(np.concatenate, (ref_m, ref_s, m, s))
        images = int(((s >= threshold) != (ref_s >= threshold)).sum())
        pixels = int(((m >= 0.5) != (ref_m >= 0.5)).sum())
        print(
            f"batch {batch}: max |map difference| {np.abs(m - ref_m).max():.2e}, max |score difference| "
            f"{np.abs(s - ref_s).max():.2e}; image decisions differing {images}/{len(s)}, "
            f"pixel decisions differing {pixels}/{m.size}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
