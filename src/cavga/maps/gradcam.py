"""Attention maps: each model's own map as its paper defines it (`paper`), and Grad-CAM variants whose
channel weights depend on the image (at several stages, of the KL term, of the reconstruction error)."""

from __future__ import annotations

import torch

from cavga.attention import (
    advae_attention,
    inference_attention,
    inference_class_attention,
    multiscale_attention,
    upsample,
)
from cavga.losses import ssim_map
from cavga.maps.registry import MAPS, MapContext, MapSpec, register_map
from cavga.networks import CAVGA, MODELS

GRADCAM_STRIDES = (8, 16, 32)


def paper_map(ctx: MapContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own map as published, (B, H, W), its image score (B,) and the attention to show
    in panels (B, H, W): see `PAPER_MAPS` in cavga.networks.model. CAVGA-u and VAE-grad score with
    the paper's s_a = mean |x − x̂|. Models whose own map is a registered map (the training-free
    anchors) get that map's raw values here; `MapMaker` replaces them with the calibrated ones."""
    model, x, out, size = ctx.model, ctx.x, ctx.out, ctx.size
    kind = MODELS[model.name].paper_map
    residual_score = (x - out.recon).abs().flatten(1).mean(1)
    if kind == "attention-u":
        A = upsample(inference_attention(model, out.F), size)
        return 1.0 - A, residual_score, A
    if kind == "attention-w":
        A = upsample(inference_class_attention(model, out)[1], size)
        # C decides (its anomalous probability is the image score), A^anomalous localises.
        return A, torch.softmax(out.class_logits, 1)[:, 1], A
    if kind == "advae":
        A = upsample(advae_attention(model, out.F), size)
        return A, residual_score, A
    if kind == "l2":
        m = (x - out.recon).pow(2).mean(1)
    elif kind == "ssim":
        m = (1.0 - ssim_map(x, out.recon)).mean(1)
    elif kind in MAPS:
        m = ctx.done[kind]
    else:
        raise ValueError(f"unknown paper map {kind!r}")
    return m, m.flatten(1).amax(1) if kind in MAPS else m.flatten(1).mean(1), m


def _paper(ctx: MapContext) -> tuple[torch.Tensor, torch.Tensor]:
    m, score, ctx.done["attention"] = paper_map(ctx)
    return m, score


PAPER = MapSpec(
    "paper",
    "the model's own map as its paper defines it: 1 − A for CAVGA-u, A^anomalous for CAVGA-w, "
    "the residual or 1 − SSIM for the autoencoders, the ADVAE attention for VAE-grad, the anchors' "
    "nearest-neighbour maps (see `cavga models`)",
    _paper,
    calibrated=False,
)


def _trainable(model: CAVGA) -> bool:
    return model.decoder is not None


def _variational(model: CAVGA) -> bool:
    return model.decoder is not None and model.latent.logvar is not None


def _gradcam(score: str):
    def compute(ctx: MapContext) -> tuple[torch.Tensor, None]:
        a = multiscale_attention(ctx.model, ctx.x, score, GRADCAM_STRIDES)[0]
        return (1.0 - a if score == "sum-z" else a), None

    return compute


register_map(PAPER)  # first: tables list each model's own map before the others
for name, score, needs, what in (
    (
        "gradcam-multiscale",
        "sum-z",
        _trainable,
        "1 − A, A the paper's Grad-CAM of Σz taken at strides 8, 16 and 32, averaged",
    ),
    (
        "gradcam-kl",
        "kl",
        _variational,
        "Grad-CAM of the image's KL term (non-linear in z) at strides 8, 16 and 32, averaged",
    ),
    (
        "gradcam-recon",
        "recon",
        _trainable,
        "Grad-CAM of the image's reconstruction error at strides 8, 16 and 32, averaged",
    ),
):
    register_map(MapSpec(name, what, _gradcam(score), calibrated=False, needs=needs))
del name, score, needs, what
