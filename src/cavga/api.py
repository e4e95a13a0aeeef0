"""Python API for notebooks and services: load a trained run and predict on images.

>>> from cavga import load_run
>>> predictor = load_run("runs/brick")
>>> p = predictor.predict("part.png")          # a path, a PIL image or a NumPy array
>>> p.score, p.is_anomalous, p.anomaly_map.shape, p.mask.sum()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cavga.data import image_to_tensor, is_grey, open_image
from cavga.engine.run import load_checkpoint, load_model, resolve_device
from cavga.errors import CavgaError, DataError, RunError
from cavga.maps import MapMaker, available_maps, run_maps
from cavga.visualize import chw_to_image

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    """The result for one image. Maps are at the image's own size unless noted."""

    source: str
    score: float  # image anomaly score of the run's map (higher = more anomalous)
    threshold: float  # score threshold set on held-out normal images (target false-alarm rate)
    is_anomalous: bool
    anomaly_map: np.ndarray  # (H, W) float in [0, 1]; ≥ 0.5 means anomalous
    mask: np.ndarray  # (H, W) bool, anomaly_map ≥ 0.5
    attention: np.ndarray | None  # (h, w) the paper's attention A at the model's size (None from ONNX)
    reconstruction: np.ndarray | None  # (h, w) or (h, w, 3) x̂ in [0, 1] at the model's size (None from ONNX)
    image: np.ndarray  # (h, w) or (h, w, 3) the input as the model saw it
    # Weakly supervised models only: C's anomalous probability, and its decision (≥ 0.5), as in the paper.
    class_probability: float | None = None
    classifier_anomalous: bool | None = None


def to_pil(image: ImageLike) -> tuple[Image.Image, str]:
    """A PIL image and a name for it from a path, a PIL image or an array ((H,W) or (H,W,C))."""
    if isinstance(image, (str, Path)):
        return open_image(Path(image)), str(image)
    if isinstance(image, Image.Image):
        return image, "<PIL image>"
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise DataError(f"array of shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 1:
                raise DataError("float arrays must hold values in [0, 1]; pass uint8 for 0–255 data")
            arr = (arr * 255).round().astype(np.uint8)
        return Image.fromarray(arr), "<array>"
    raise DataError(f"cannot predict on a {type(image).__name__}: give a path, a PIL image or a NumPy array")


class PredictorBase:
    """What every predictor shares: decoding, the channel check, and building `Prediction`s from
    the maps and scores its backend computes at the model's size (see `_infer`)."""

    model_name: str
    map_name: str
    threshold: float
    channels: int
    image_size: int
    batch_size: int
    training: dict  # what it was trained on: category, n_train

    def _tensor(self, im: Image.Image, name: str) -> torch.Tensor:
        if self.channels == 1 and not is_grey(im):
            raise DataError(f"{name}: a colour image, but the run was trained on greyscale images")
        return image_to_tensor(im, self.image_size, self.channels)

    def _infer(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """`map` (N, h, w) and `score` (N,), and where the backend has them `attention`, `recon`
        and `class_probability`."""
        raise NotImplementedError

    def predict(self, image: ImageLike, name: str | None = None) -> Prediction:
        """Score, anomaly map and mask for one image (`name`: how messages and `source` call it)."""
        return self.predict_batch([image], None if name is None else [name])[0]

    def predict_batch(self, images: list[ImageLike], names: list[str] | None = None) -> list[Prediction]:
        """Predictions for several images, computed in batches of the run's batch size. `names`
        name images given as PIL images or arrays (a path names itself) in messages and `source`."""
        pils = [to_pil(im) for im in images]
        if names is not None:
            pils = [(im, name) for (im, _), name in zip(pils, names, strict=True)]
        x = torch.stack([self._tensor(im, name) for im, name in pils])
        return self.predict_tensors(x, pils)

    def predict_tensors(self, x: torch.Tensor, pils: list[tuple[Image.Image, str]]) -> list[Prediction]:
        """Predictions for images already resized to the model's input, `x` (N, C, h, w) in [0, 1], each
        with its decoded image (whose size the map takes) and name, in batches of `batch_size`."""
        parts = [self._infer(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        results = []
        for i, (im, name) in enumerate(pils):
            full = np.asarray(
                Image.fromarray(out["map"][i].astype(np.float32)).resize(im.size, Image.Resampling.BILINEAR)
            )
            full = np.clip(full, 0.0, 1.0)
            score = float(out["score"][i])
            prob = float(out["class_probability"][i]) if "class_probability" in out else None
            results.append(
                Prediction(
                    source=name,
                    score=score,
                    threshold=self.threshold,
                    is_anomalous=score >= self.threshold,
                    anomaly_map=full,
                    mask=full >= 0.5,
                    attention=out["attention"][i] if "attention" in out else None,
                    reconstruction=chw_to_image(out["recon"][i]) if "recon" in out else None,
                    image=chw_to_image(x[i].numpy()),
                    class_probability=prob,
                    classifier_anomalous=None if prob is None else prob >= 0.5,
                )
            )
        return results


class Predictor(PredictorBase):
    """A trained run, ready to predict. Thresholds come from the run's held-out normal images."""

    def __init__(
        self, run_dir: str | Path, device: str = "auto", anomaly_map: str | None = None, extras: bool = True
    ):
        """`extras`: also give each `Prediction` its reconstruction and the paper's attention. Without
        them a map that reads only encoder stages (the default `memory`) is computed about a third
        faster; `cavga predict`, which writes neither, runs so."""
        ckpt = load_checkpoint(run_dir)
        if ckpt.get("calibration") is None:
            raise RunError(f"{run_dir} has not finished training; continue it with `cavga train --resume`")
        self.device = resolve_device(device)
        self.model, self.cfg = load_model(ckpt, self.device)
        self.map_name = anomaly_map or self.cfg.anomaly_map
        maps = available_maps(self.model)
        if self.map_name not in maps:
            raise CavgaError(
                f"anomaly map {self.map_name!r} is not available for model {self.cfg.model}; "
                f"choose one of: {', '.join(maps)}"
            )
        self.calibration = ckpt["calibration"]
        if self.map_name not in self.calibration["image_thresholds"]:
            raise CavgaError(
                f"anomaly map {self.map_name!r} was not calibrated when {run_dir} was trained (the "
                f"Grad-CAM variants are calibrated only when chosen with --anomaly-map at training)"
            )
        self.threshold = float(self.calibration["image_thresholds"][self.map_name])
        cfg = self.cfg
        self.channels, self.image_size, self.batch_size = cfg.channels, cfg.image_size, cfg.batch_size
        self.model_name = cfg.model
        data = ckpt["data"]
        self.training = {"category": data.get("category_name"), "n_train": len(data.get("train_files", []))}
        self.maker = MapMaker(
            self.model, cfg, self.calibration, self.device, (self.map_name,), attention=extras, outputs=extras
        )

    def _infer(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        out = run_maps(self.maker, x, len(x))
        res = {"map": out[self.map_name], "score": out[f"score/{self.map_name}"]}
        for key in ("recon", "attention", "class_probability"):
            if key in out:
                res[key] = out[key]
        return res


class OnnxPredictor(PredictorBase):
    """An exported `.onnx` file, run with onnxruntime: the same `Prediction`s as `Predictor`, but
    without the attention and the reconstruction (the graph returns the map and the score only)."""

    def __init__(self, path: str | Path, device: str = "auto", anomaly_map: str | None = None):
        from cavga.export import read_metadata, require

        meta = read_metadata(path)
        if anomaly_map and anomaly_map != meta["anomaly_map"]:
            raise CavgaError(
                f"{path} holds the {meta['anomaly_map']!r} map only; export the run again for {anomaly_map!r}"
            )
        ort = require("onnxruntime")
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.meta = meta
        self.map_name, self.threshold = meta["anomaly_map"], float(meta["threshold"])
        self.channels, self.image_size, self.batch_size = (
            meta["channels"],
            meta["image_size"],
            meta["batch_size"],
        )
        self.model_name = meta["model"]
        self.training = {"category": meta.get("category"), "n_train": meta.get("n_train")}

    def _infer(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        m, s = self.session.run(None, {"images": x.numpy()})
        return {"map": m, "score": s}


def load_run(
    run_dir: str | Path, device: str = "auto", anomaly_map: str | None = None, extras: bool = True
) -> PredictorBase:
    """Load a trained run folder, or a `.onnx` file `cavga export` wrote, for prediction (`extras`: see
    `Predictor`; an exported graph has none)."""
    if Path(run_dir).suffix.lower() == ".onnx" and Path(run_dir).is_file():
        return OnnxPredictor(run_dir, device, anomaly_map)
    return Predictor(run_dir, device, anomaly_map, extras)
