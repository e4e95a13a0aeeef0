"""Run folders: device choice, seeding, atomic checkpoints, and loading a run back."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cavga import __version__
from cavga.config import TrainConfig
from cavga.errors import RunError
from cavga.networks import CAVGA, MODELS, create_model
from cavga.networks.resnet import ResNetEncoder, seeded_stages, stages_reading

CHECKPOINT = "checkpoint.pt"
REQUIRED_KEYS = ("model", "config", "step", "version", "model_name")
# The layout of checkpoint.pt. Raise it when a change means older cavga versions cannot read
# the file; a checkpoint without the key predates it and is format 1.
CHECKPOINT_FORMAT = 1


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
    model = create_model(cfg.model, cfg.image_size, cfg.channels or 3, **kwargs)
    if cfg.feature_encoders > 1:
        if not isinstance(model.encoder, ResNetEncoder) or cfg.weights:
            raise RunError(
                f"feature_encoders {cfg.feature_encoders}: further encoders are random ResNet-18 "
                f"stages of other seeds, for a ResNet model from random weights, not {cfg.model}"
                + (f" with weights {cfg.weights}" if cfg.weights else "")
            )
        stages = stages_reading((*cfg.memory_layers, *cfg.stats_layers))  # what the maps read
        for k in range(1, cfg.feature_encoders):
            # Only pre-training trains them (it switches their gradients on while it runs).
            model.extra_encoders.append(
                seeded_stages(cfg.channels or 3, stages, cfg.seed + k).requires_grad_(False)
            )
    # Convolutions with channels-last weights run channels-last whatever the input's layout: on a
    # 2-core AMD EPYC (Zen 3) CAVGA-Ru trained 16–25 % and ran its forward pass 33–45 % faster at 128
    # and 256 px, CAVGA-Du's training unchanged (README, the scale section).
    return model.to(memory_format=torch.channels_last)


def _write_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename over `path`: a process killed (or a disk that fills) part way
    leaves the previous file intact. The data are flushed to disk before the rename, so even a
    power cut cannot leave `path` pointing at a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise RunError(f"cannot write {path}: {why}{kept}") from e


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (see `_write_atomically`); tensors and plain data only, so it
    loads with `weights_only=True`."""
    state = {**state, "version": __version__, "format": CHECKPOINT_FORMAT}
    _write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read and check a run's checkpoint; RunError with the reason when it is not usable.

    Only tensors and plain Python data are unpickled (`weights_only=True`): a run folder from
    somebody else can never run code on this machine, whatever its checkpoint holds.
    """
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise RunError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise RunError(f"no {CHECKPOINT} in {run_dir}: not a cavga run folder, or training never saved")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refuses every class and function it does not allow, and
        # names it; any other unpickling error means the bytes are not a pickle at all.
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        if wanted:
            raise RunError(
                f"refused to load {path}: it asks to import {wanted.group(1)}, and objects other than "
                "tensors and plain data could run code; cavga never writes such files (replaced, or "
                "made by another program?)"
            ) from e
        raise RunError(f"cannot read {path}: the file is truncated or corrupt (not a checkpoint)") from e
    except Exception as e:
        # Damaged bytes can fail the unpickler in any way (IndexError, KeyError, struct.error, …).
        raise RunError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise RunError(f"{path} is not a cavga checkpoint (missing keys)")
    fmt = ckpt.get("format", 1)
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        raise RunError(
            f"{path} was written by cavga {ckpt['version']} in checkpoint format {fmt}; this cavga "
            f"({__version__}) reads format {CHECKPOINT_FORMAT} and older: upgrade cavga"
        )
    if ckpt["model_name"] not in MODELS:
        raise RunError(
            f"{path} holds model {ckpt['model_name']!r}, which this version of cavga does not know"
        )
    return ckpt


def load_model(ckpt: dict[str, Any], device: torch.device) -> tuple[CAVGA, TrainConfig]:
    """Rebuild the network of a checkpoint and load its weights."""
    try:
        cfg = TrainConfig.from_saved(ckpt["config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise RunError(f"the checkpoint's configuration is not valid: {e}") from e
    model = build_model(cfg)  # the weights come from the checkpoint, never re-downloaded
    load_weights(model, ckpt["model"], f"model {cfg.model} at {cfg.image_size} px")
    return model.to(device).eval(), cfg


def load_weights(model: torch.nn.Module, weights: Any, what: str) -> None:
    """`load_state_dict`, with a one-line RunError when the weights belong to another network."""
    if not isinstance(weights, dict):
        raise RunError(f"the checkpoint's weights are not a state dict, so they cannot be {what}")
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and getattr(weights[k], "shape", None) != own[k].shape]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise RunError(
            f"the checkpoint's weights do not fit {what} (another model or variant?): "
            f"{len(missing)} missing, {len(extra)} unexpected and {len(wrong)} mis-shaped tensors, "
            f"for example {first!r}"
        )
    model.load_state_dict(weights)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON, written atomically (parent folders are created)."""
    text = json.dumps(data, indent=2, default=str)
    _write_atomically(path, lambda tmp: tmp.write_text(text))
