"""The registry of anomaly maps: what a map needs (a fitted state from normal images, a backward pass)
and how it is computed from one forward pass. Each family registers its maps from its own module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cavga.config import TrainConfig
from cavga.networks import CAVGA, ModelOutput


@dataclass
class MapContext:
    """What a map is computed from: one forward pass (z = μ) on a batch and the run's fitted states."""

    model: CAVGA
    cfg: TrainConfig
    x: torch.Tensor  # (B, C, H, W) in [0, 1]
    out: ModelOutput
    fitted: dict  # fitted state per map name (from normal training images), see `Fitter`
    done: dict[str, torch.Tensor] = field(default_factory=dict)  # raw maps already computed for this batch
    scales: dict[str, float] = field(default_factory=dict)  # normal 99th percentiles (derived maps need them)

    @property
    def size(self) -> int:
        return self.x.shape[-1]


class Fitter:
    """Accumulates what a map needs from the normal training images, one batch at a time."""

    def update(self, x: torch.Tensor, out: ModelOutput) -> None:
        """Take one batch of normal training images and its forward pass."""
        raise NotImplementedError

    def finish(self) -> dict:
        """The fitted state (tensors and plain values, stored in the checkpoint)."""
        raise NotImplementedError

    # Several processes: each fitter sees its rank's share of the images; rank 0 gathers the others'
    # accumulations and merges them before `finish`. By default what is accumulated is a list of
    # per-batch `parts` (CPU tensors); a fitter that keeps sums instead overrides both.
    parts: list

    def accumulated(self) -> object:
        """What this fitter has accumulated, picklable, to be merged into another rank's fitter."""
        return self.parts

    def merge(self, accumulated: list) -> None:
        """Take in other fitters' `accumulated()` as if this fitter had seen their images too."""
        for parts in accumulated:
            self.parts.extend(parts)


@dataclass(frozen=True)
class MapSpec:
    """A registered map.

    `compute` gives the raw map (B, H, W) at the input size and, where the map has one, its own raw
    image score (B,) (the nearest-image distance, say), else None. Calibrated maps are divided by their
    99th percentile on held-out normal images and squashed to [0, 1); their image score is their own or
    their peak, optionally fused with the whole-image score (see `cavga.maps.calibration`).
    Uncalibrated maps (the Grad-CAM ones, scaled per image) score with the paper's reconstruction error.
    Maps with `after` are derived from other maps' raw values and scales, once those are known.
    """

    name: str
    description: str
    compute: Callable[[MapContext], tuple[torch.Tensor, torch.Tensor | None]]
    fitter: Callable[[CAVGA, TrainConfig, int], Fitter] | None = None  # (model, cfg, number of images)
    calibrated: bool = True
    needs: Callable[[CAVGA], bool] | None = None  # None: every model can make it
    after: tuple[str, ...] = ()  # maps this one is computed from (computed first)
    # Computed from the input and the encoder stages alone (no z, reconstruction or classifier), so
    # a pass that needs nothing else can stop at the encoder (`MapMaker(outputs=False)`).
    features_only: bool = False


MAPS: dict[str, MapSpec] = {}


def register_map(spec: MapSpec) -> None:
    """Add a map to `MAPS` (the order of registration is the order of computation and of tables)."""
    MAPS[spec.name] = spec


def available_maps(model: CAVGA) -> tuple[str, ...]:
    """The maps a model can make."""
    return tuple(n for n, s in MAPS.items() if s.needs is None or s.needs(model))
