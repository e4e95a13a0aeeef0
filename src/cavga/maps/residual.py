"""Reconstruction maps: the residual |x − x̂| and its fusion with `latent-stats`."""

from __future__ import annotations

import torch

from cavga.maps.common import blur
from cavga.maps.registry import MapContext, MapSpec, register_map
from cavga.networks import CAVGA


def _has_decoder(model: CAVGA) -> bool:
    return model.decoder is not None


def _residual(ctx: MapContext) -> tuple[torch.Tensor, None]:
    return blur((ctx.x - ctx.out.recon).abs().mean(1), ctx.cfg), None


def fuse(raw: dict[str, torch.Tensor], scales: dict[str, float]) -> torch.Tensor:
    """Mean of latent-stats and residual, each divided by its own normal 99th percentile: weights set
    on normal images only."""
    return 0.5 * (raw["latent-stats"] / scales["latent-stats"] + raw["residual"] / scales["residual"])


def _fusion(ctx: MapContext) -> tuple[torch.Tensor, None]:
    return fuse(ctx.done, ctx.scales), None


register_map(MapSpec("residual", "|x − x̂| averaged over channels and smoothed (reference)", _residual))
register_map(
    MapSpec(
        "fusion",
        "mean of the calibrated latent-stats and residual maps",
        _fusion,
        needs=_has_decoder,
        after=("latent-stats", "residual"),
    )
)
