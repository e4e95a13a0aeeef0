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
from cavga.engine.evaluate import run_maps
from cavga.engine.run import load_checkpoint, load_model, resolve_device
from cavga.errors import CavgaError, DataError, RunError
from cavga.maps import MapMaker, available_maps
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
    attention: np.ndarray  # (h, w) the paper's attention A at the model's input size
    reconstruction: np.ndarray  # (h, w) or (h, w, 3) x̂ in [0, 1] at the model's input size
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


class Predictor:
    """A trained run, ready to predict. Thresholds come from the run's held-out normal images."""

    def __init__(self, run_dir: str | Path, device: str = "auto", anomaly_map: str | None = None):
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
        self.maker = MapMaker(self.model, self.cfg, self.calibration, self.device, maps=(self.map_name,))

    def _tensor(self, im: Image.Image, name: str) -> torch.Tensor:
        if self.cfg.channels == 1 and not is_grey(im):
            raise DataError(f"{name}: a colour image, but the run was trained on greyscale images")
        return image_to_tensor(im, self.cfg.image_size, self.cfg.channels)

    def predict(self, image: ImageLike) -> Prediction:
        """Score, anomaly map and mask for one image."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[ImageLike]) -> list[Prediction]:
        """Predictions for several images, computed in batches of the run's batch size."""
        pils = [to_pil(im) for im in images]
        x = torch.stack([self._tensor(im, name) for im, name in pils])
        out = run_maps(self.maker, x, self.cfg.batch_size)
        results = []
        for i, (im, name) in enumerate(pils):
            small = out[self.map_name][i]
            full = np.asarray(
                Image.fromarray(small.astype(np.float32)).resize(im.size, Image.Resampling.BILINEAR)
            )
            full = np.clip(full, 0.0, 1.0)
            score = float(out[f"score/{self.map_name}"][i])
            prob = float(out["class_probability"][i]) if "class_probability" in out else None
            results.append(
                Prediction(
                    source=name,
                    score=score,
                    threshold=self.threshold,
                    is_anomalous=score >= self.threshold,
                    anomaly_map=full,
                    mask=full >= 0.5,
                    attention=out["attention"][i],
                    reconstruction=chw_to_image(out["recon"][i]),
                    image=chw_to_image(x[i].numpy()),
                    class_probability=prob,
                    classifier_anomalous=None if prob is None else prob >= 0.5,
                )
            )
        return results


def load_run(run_dir: str | Path, device: str = "auto", anomaly_map: str | None = None) -> Predictor:
    """Load a trained run folder for prediction."""
    return Predictor(run_dir, device, anomaly_map)
