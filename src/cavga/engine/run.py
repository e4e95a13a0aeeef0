"""Run folders: device choice, seeding, atomic checkpoints, and loading a run back."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cavga import __version__
from cavga.config import TrainConfig
from cavga.errors import RunError
from cavga.networks import CAVGA, MODELS, create_model

CHECKPOINT = "checkpoint.pt"
REQUIRED_KEYS = ("model", "config", "step", "version", "model_name")


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" → CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {name} asked for, but this machine has no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is reproducible on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, weights: str | None = None) -> CAVGA:
    """The network a config describes (weights: override of cfg.weights, e.g. none when loading)."""
    kwargs: dict[str, Any] = {"disc_width": cfg.disc_width}
    if cfg.latent_channels:
        kwargs["latent_channels"] = cfg.latent_channels
    if weights:
        kwargs["weights"] = weights
    return create_model(cfg.model, cfg.image_size, cfg.channels or 3, **kwargs)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a stopped process never leaves a half-written checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "version": __version__}, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read and check a run's checkpoint; RunError with the reason when it is not usable."""
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise RunError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise RunError(f"no {CHECKPOINT} in {run_dir}: not a cavga run folder, or training never saved")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(f"cannot read {path}: {e}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise RunError(f"{path} is not a cavga checkpoint (missing keys)")
    if ckpt["model_name"] not in MODELS:
        raise RunError(
            f"{path} holds model {ckpt['model_name']!r}, which this version of cavga does not know"
        )
    return ckpt


def load_model(ckpt: dict[str, Any], device: torch.device) -> tuple[CAVGA, TrainConfig]:
    """Rebuild the network of a checkpoint and load its weights."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg)  # the weights come from the checkpoint, never re-downloaded
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise RunError(f"checkpoint weights do not fit model {cfg.model} at {cfg.image_size} px: {e}") from e
    return model.to(device).eval(), cfg


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON, written atomically (parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
