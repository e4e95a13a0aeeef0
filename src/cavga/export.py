"""`cavga export`: one ONNX graph from a batch of images to the calibrated anomaly map and the image
score, with everything needed to decide (threshold, map, image size) in the file's metadata.

The graph takes ``images`` (N, C, H, W) float32 in [0, 1] at the run's size, N dynamic, and returns
``anomaly_map`` (N, H, W) in [0, 1] (≥ 0.5 is anomalous) and ``score`` (N,) (≥ the threshold is
anomalous). The normal statistics, memories and calibration scales are constants of the graph.
The computation is the PyTorch one (`cavga.maps.MapMaker`) traced by `torch.onnx.export`, so the two
agree to float rounding. onnx, onnxscript and onnxruntime come with ``pip install 'cavga[export]'``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType

import torch

from cavga import __version__
from cavga.engine.run import load_checkpoint, load_model
from cavga.errors import RunError
from cavga.errors import require as require_extra
from cavga.maps import MAPS, MapMaker, available_maps
from cavga.maps.calibration import costly
from cavga.networks import MODELS

ONNX_FORMAT = 1  # the layout of the graph's inputs, outputs and metadata
METADATA_KEY = "cavga"
# The models whose own map is a Grad-CAM attention: it needs a backward pass, which an inference
# graph does not have.
_GRADIENT_OWN_MAPS = frozenset({"attention-u", "attention-w", "advae"})


def require(module: str) -> ModuleType:
    """Import an optional dependency of export, or say how to install it."""
    return require_extra(module, "export", "ONNX support (export and prediction)")


def exportable(model_name: str, map_name: str) -> bool:
    """Whether a map can go into an inference graph (no backward pass)."""
    if costly(map_name):
        return False
    return not (map_name == "paper" and MODELS[model_name].paper_map in _GRADIENT_OWN_MAPS)


class MapGraph(torch.nn.Module):
    """The calibrated map and image score of one map, as a module to trace."""

    def __init__(self, maker: MapMaker, map_name: str):
        super().__init__()
        self.maker, self.model, self.map_name = maker, maker.model, map_name

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.maker.calibrated(self.maker.raw(images))
        return res[self.map_name], res[f"score/{self.map_name}"]


def export_onnx(run_dir: str | Path, out: str | Path | None = None, anomaly_map: str | None = None) -> Path:
    """Export a trained run's calibrated map and image score as one ONNX file; returns its path.

    Args:
        run_dir: A finished run folder.
        out: The .onnx file to write (default: `<run>/model.onnx`).
        anomaly_map: The map to export (default: the run's own, `config.anomaly_map`).

    Raises:
        RunError: The run has not finished, or the map cannot be exported (Grad-CAM maps need a
            backward pass) or was not calibrated.
        CavgaError: onnx / onnxscript are not installed.
    """
    require("onnx")
    require("onnxscript")
    import onnx

    run = Path(run_dir)
    ckpt = load_checkpoint(run)
    if ckpt.get("calibration") is None:
        raise RunError(f"{run} has not finished training; continue it with `cavga train --resume`")
    model, cfg = load_model(ckpt, torch.device("cpu"))
    name = anomaly_map or cfg.anomaly_map
    if name not in available_maps(model):
        choices = ", ".join(available_maps(model))
        raise RunError(f"model {cfg.model} cannot make the {name!r} map; choose one of: {choices}")
    if not exportable(cfg.model, name):
        raise RunError(
            f"the {name!r} map of {cfg.model} is a Grad-CAM attention, which needs a backward pass that an "
            "inference graph does not have; export a calibrated map instead (--anomaly-map "
            f"{', '.join(n for n in available_maps(model) if MAPS[n].calibrated and n != 'paper')})"
        )
    thresholds = ckpt["calibration"]["image_thresholds"]
    if name not in thresholds:
        raise RunError(f"the {name!r} map was not calibrated when {run} was trained; export one that was")
    maker = MapMaker(model, cfg, ckpt["calibration"], torch.device("cpu"), maps=(name,), attention=False)
    graph = MapGraph(maker, name).eval()
    path = Path(out) if out else run / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constants are not the user's concern
        torch.onnx.export(
            graph,
            (example,),
            path,
            dynamo=True,
            input_names=["images"],
            output_names=["anomaly_map", "score"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    proto = onnx.load(path)
    meta = {
        "format": ONNX_FORMAT,
        "cavga_version": __version__,
        "model": cfg.model,
        "setting": MODELS[cfg.model].setting,
        "anomaly_map": name,
        "image_score": cfg.image_score,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "threshold": float(thresholds[name]),
        "map_threshold": 0.5,
        "batch_size": cfg.batch_size,
        "category": ckpt["data"].get("category_name"),
        "n_train": len(ckpt["data"].get("train_files", [])),
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    size = f"{cfg.image_size}, {cfg.image_size}"
    proto.doc_string = (
        f"cavga {cfg.model} ({name} map): images (N, {cfg.channels}, {size}) in [0, 1] → anomaly_map "
        f"(N, H, W), anomalous where ≥ 0.5, and score (N,), anomalous where ≥ {meta['threshold']:.6g}"
    )
    onnx.save(proto, path)
    return path


def read_metadata(path: str | Path) -> dict:
    """The cavga metadata of an exported file; RunError when it is not one."""
    onnx = require("onnx")
    path = Path(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError, ... for a bad file
        raise RunError(f"cannot read {path} as an ONNX model: {type(e).__name__}") from e
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise RunError(f"{path} is an ONNX model but not one cavga exported (no {METADATA_KEY!r} metadata)")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("format", 1) > ONNX_FORMAT:
        raise RunError(
            f"{path} was exported by cavga {meta.get('cavga_version')} in a newer format: upgrade cavga"
        )
    return meta
