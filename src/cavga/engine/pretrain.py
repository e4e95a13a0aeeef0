"""Encoder pre-training on synthetic anomalies (ours; `--pretrain-steps N`).

The `memory` and `latent-stats` maps and the whole-image score read the ResNet encoder's early stages
(stride 4 and 8 by default). The CAVGA objective does not change what those stages tell apart: a random
encoder gives the default map the same figures as a trained one (docs/method.md). Pre-training trains
them, before the CAVGA steps, to mark per position where `cavga.data.synthetic` altered a normal image:
a 1×1 head on the memory map's own input (the stages, neighbourhood-averaged and stacked) is fitted
with binary cross-entropy, the rare altered positions weighted up. Only normal training images are
read, and each is seen as the maps see it (standardised when `feature_input` says so).

Measured (docs/method.md, "Experiment: the encoder trained to segment synthetic anomalies" and "The
default schedule"): it helps where defects are local and the synthetic ones are learned (solar-cell
cracks, gravel), and where they are not learned it loses what random stages keep of a shape or a
fine texture (digits, the script's grass run). So a pre-training whose loss stays high is undone
(`kept`), and the default model's schedule pre-trains (`cavga.config.DEFAULT_PRETRAIN_STEPS`). The
head is thrown away afterwards; the maps keep their memory of normal features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cavga.config import TrainConfig
from cavga.errors import RunError
from cavga.maps.memory import memory_features
from cavga.networks import CAVGA, ModelOutput
from cavga.networks.anchor import standardize
from cavga.networks.resnet import ResNetEncoder, stages_reading

# Adam's learning rate for the pre-training (the encoder's own, not the CAVGA steps' `lr`).
PRETRAIN_LR = 5e-4
# The weight of an altered position is (unaltered share) / (altered share), at most this, so that a
# batch with one tiny anomaly does not swamp the rest.
MAX_POSITIVE_WEIGHT = 20.0
HEAD_WIDTH = 64
# Pre-training that ends with a loss (mean of its last 50 steps) above this did not learn to find
# the synthetic anomalies, and its stages are set back to their initial weights (`kept`).
PRETRAIN_MAX_LOSS = 0.7


def pretrain_stages(model: CAVGA, cfg: TrainConfig) -> int:
    """How many ResNet stages pre-training trains: up to the deepest stage the memory map reads.

    Raises a `RunError` for a model without a ResNet encoder or a memory that reads z."""
    if not isinstance(model.encoder, ResNetEncoder):
        raise RunError(f"--pretrain-steps trains a ResNet-18 encoder; model {cfg.model} has none")
    if "z" in cfg.memory_layers:
        raise RunError("--pretrain-steps trains the encoder stages the memory map reads, not z")
    return stages_reading(cfg.memory_layers)


def encoders(model: CAVGA) -> list[nn.Module]:
    """The encoders whose stages the maps read: the model's own, then its extra ones (pre-trained one
    after the other, the k-th with seed `seed` + k)."""
    return [model.encoder, *model.extra_encoders]


def pretrained_parts(model: CAVGA, cfg: TrainConfig, index: int = 0) -> list[nn.Module]:
    """The stem and the stages pre-training trains of encoder `index` (see `encoders`)."""
    encoder = encoders(model)[index]
    return [encoder.stem, *encoder.layers[: pretrain_stages(model, cfg)]]


class Segmenter(nn.Module):
    """An encoder's first stages (encoder `index` of `encoders`; its seed is `cfg.seed`) and a 1×1
    head: per memory-map position, the logit that a synthetic anomaly altered it. The encoder's later
    stages take no part (`trainable` freezes them for DDP)."""

    def __init__(self, model: CAVGA, cfg: TrainConfig, index: int = 0):
        super().__init__()
        self.cfg = cfg
        self.stages = pretrain_stages(model, cfg)
        self.encoder = encoders(model)[index]
        self.parts = pretrained_parts(model, cfg, index)
        # ResNet-18's stage at stride s has 16·s channels (64 at stride 4 … 512 at stride 32).
        width = sum(16 * int(name.removeprefix("s")) for name in dict.fromkeys(cfg.memory_layers))
        # Drawn from its own seed: the global random stream stays where training left it, so a run
        # resumed in the middle of pre-training continues exactly as an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.head = nn.Sequential(
                nn.Conv2d(width, HEAD_WIDTH, 1), nn.ReLU(True), nn.Conv2d(HEAD_WIDTH, 1, 1)
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The memory map's input for images `x` in [0, 1]: the same stages, pooling and stacking."""
        x = standardize(x) if self.cfg.feature_input == "standardised" else x
        feats = self.encoder(x, self.stages)
        return memory_features(ModelOutput(feats, feats[max(feats)], None, None, None, None, None), self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 1, h, w) logits

    def trainable(self) -> list[nn.Parameter]:
        """Marks the stem, the stages read and the head as the only parameters that need gradients
        (the later stages would otherwise be unused parameters to DDP), and returns them."""
        self.requires_grad_(False)
        parts = [*self.parts, self.head]
        for part in parts:
            part.requires_grad_(True)
        return [p for part in parts for p in part.parameters()]


def kept(final_loss: float) -> bool:
    """Whether the pre-trained stages are kept, from pre-training's final loss (the mean of its last
    50 steps) alone: normal images and their synthetic anomalies, no real anomaly.

    Measured (docs/method.md, "The default schedule"): where the head learned the synthetic
    anomalies the trained stages gained or held (ELPV mono, loss 0.40-0.50: +0.02 to +0.03 image
    AUROC; gravel 0.54-0.64: +0.04 to +0.06 pixel AUROC; ELPV poly 0.44-0.49, brick 0.46 and grass
    0.65: within ±0.015), and where it did not they lost what the random stages carried (the
    script's grass run, 0.77: image AUROC 0.81 → 0.65; digits 0.86-0.93: -0.03)."""
    return final_loss <= PRETRAIN_MAX_LOSS


def freeze_pretrained(model: CAVGA, cfg: TrainConfig) -> list[nn.Module]:
    """The pre-trained stem and stages, and the extra encoders whole, kept as they are through the
    CAVGA steps: no gradient, and BatchNorm statistics fixed (call `.eval()` on the returned modules
    after `model.train()`). Also when pre-training was set back: the stages then stay the random ones.

    Without this the CAVGA steps undo the pre-training: on ELPV mono, 300 default steps after it
    took the fused image AUROC from 0.944 back to 0.926 (a random encoder: 0.918). They train on the
    raw image, the maps read the standardised one. Where pre-training is set back (digits), the same
    steps lowered digit 5 from 0.959 to 0.937 and digit 2 from 0.974 to 0.968."""
    parts = [*pretrained_parts(model, cfg), *model.extra_encoders]
    for part in parts:
        part.requires_grad_(False)
    return parts


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each position's logit against whether any pixel of its cell was
    altered (`masks`: (B, H, W) from `synthesize`), altered cells weighted up by their rarity."""
    target = F.adaptive_max_pool2d(masks[:, None].float(), logits.shape[-2:])
    share = target.mean().clamp_min(1e-3)
    weight = ((1 - share) / share).clamp(max=MAX_POSITIVE_WEIGHT)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
