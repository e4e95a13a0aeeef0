"""CAVGA-R: torchvision ResNet-18 encoder (stride 32) and the residual decoder."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from cavga.errors import CavgaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetEncoder(nn.Module):
    """ResNet-18 `conv1 … layer4`; returns the feature map of every stage, keyed by stride."""

    out_channels = 512
    stride = 32

    def __init__(self, in_channels: int, weights: str | None = None):
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        state = load_resnet_weights(weights) if weights else None
        if state is not None:
            net.load_state_dict(state)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        # Grey images are repeated to three channels, so ImageNet weights see a grey image exactly
        # as they would see its RGB copy (conv1 on one channel costs hardly less).
        self.repeat = 3 // in_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = x.repeat(1, self.repeat, 1, 1)  # (B, 3, H, W)
        h = self.stem((x - self.mean) / self.std)  # (B, 64, H/4, W/4)
        feats = {}
        for stride, layer in zip((4, 8, 16, 32), self.layers, strict=True):
            h = layer(h)
            feats[stride] = h  # (B, 64·2^k, H/stride, W/stride)
        return feats


def load_resnet_weights(weights: str) -> dict[str, torch.Tensor]:
    """ResNet-18 weights: "imagenet" (torchvision's, downloaded once) or a state-dict file."""
    if weights == "imagenet":
        try:
            sd = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # network failures surface as many exception types
            raise CavgaError(
                f"could not download torchvision's ImageNet ResNet-18 weights ({e}); "
                "download them on a machine with internet access and pass the file with --weights PATH"
            ) from e
        return sd
    path = Path(weights)
    if not path.is_file():
        raise CavgaError(f"ResNet-18 weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CavgaError(f"cannot read ResNet-18 weights from {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    reference = torchvision.models.resnet18(weights=None).state_dict()
    if not isinstance(sd, dict):
        raise CavgaError(f"{path} does not hold a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith("fc.")}
    missing = [k for k in reference if not k.startswith("fc.") and k not in sd]
    wrong = [k for k, v in sd.items() if k in reference and tuple(v.shape) != tuple(reference[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shape for {wrong[:3]}"
        raise CavgaError(f"{path} is not a torchvision ResNet-18 state dict: {detail}")
    sd.update({k: v for k, v in reference.items() if k.startswith("fc.")})
    return {k: sd[k] for k in reference}


class ResidualUpBlock(nn.Module):
    """Upsample ×2 → conv3×3 → BN → ReLU, plus a skip from the upsampled input.

    The skip raises the mutual information between z and x and avoids latent collapse (paper §4).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up(x)
        return self.conv(u) + self.skip(u)


class ResidualDecoder(nn.Module):
    """Residual generator from the latent grid back to the image (returns logits)."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        stride: int = 32,
        width: int = 256,
        min_width: int = 16,
    ):
        super().__init__()
        n = int(math.log2(stride))
        blocks, c_in = [], latent_channels
        for i in range(n):
            c_out = max(width // 2**i, min_width)
            blocks.append(ResidualUpBlock(c_in, c_out))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(c_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(z))  # (B, C, H, W) logits
