"""CAVGA-R: the ResNet-18 encoder (stride 32; torchvision's network and weights) and the residual
decoder."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from cavga.errors import CavgaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3×3 convolutions and a skip (1×1 conv when it strides)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Trunk(nn.Module):
    """torchvision's `resnet18` up to `layer4`: the same modules, names and initialisation, so its
    state dicts load as they are and a seeded model draws exactly the weights torchvision's would
    (a test checks both).

    Written out rather than imported because importing torchvision costs every cavga process about
    160 MB of memory and 2 s (its detection ops import torch._dynamo and Triton); torchvision is
    still used, lazily, for its ImageNet weights and datasets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        for i, c in enumerate(widths):
            c_in, stride = widths[max(i - 1, 0)], 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c, 1)))
        # torchvision builds its 1000-class classifier here, drawing from the random stream before
        # the convolutions are re-initialised; drawing the same keeps seeded weights identical.
        nn.Linear(512, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ResNetEncoder(nn.Module):
    """ResNet-18 `conv1 … layer4`; returns the feature map of every stage, keyed by stride."""

    out_channels = 512
    stride = 32

    def __init__(self, in_channels: int, weights: str | None = None):
        super().__init__()
        net = ResNet18Trunk()
        if weights:
            net.load_state_dict(load_resnet_weights(weights))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        # Grey images are repeated to three channels, so ImageNet weights see a grey image exactly
        # as they would see its RGB copy (conv1 on one channel costs hardly less).
        self.repeat = 3 // in_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, stages: int = 4) -> dict[int, torch.Tensor]:
        """The first `stages` stages (all it has by default), keyed by stride."""
        stages = min(stages, len(self.layers))
        x = x.repeat(1, self.repeat, 1, 1)  # (B, 3, H, W)
        h = self.stem((x - self.mean) / self.std)  # (B, 64, H/4, W/4)
        feats = {}
        for stride, layer in zip((4, 8, 16, 32)[:stages], self.layers[:stages], strict=True):
            h = layer(h)
            feats[stride] = h  # (B, 64·2^k, H/stride, W/stride)
        return feats


def stages_reading(names: Iterable[str]) -> int:
    """How many ResNet stages compute the encoder stages named by stride ("s4" is the first, "s32"
    the fourth; "z" is not a stage and is left out): up to the deepest named, at least one."""
    return max((int(math.log2(int(n.removeprefix("s")))) - 1 for n in names if n != "z"), default=1)


def seeded_stages(in_channels: int, stages: int, seed: int) -> ResNetEncoder:
    """A random `ResNetEncoder` with only its first `stages` stages, drawn as the first thing after
    `torch.manual_seed(seed)`, in a forked random stream so that the caller's stays where it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ResNetEncoder(in_channels)
    encoder.layers = encoder.layers[:stages]
    return encoder


def load_resnet_weights(weights: str) -> dict[str, torch.Tensor]:
    """ResNet-18 weights for `ResNet18Trunk`: "imagenet" (torchvision's, downloaded once) or a
    torchvision ResNet-18 state-dict file (its classifier, if any, is dropped)."""
    if weights == "imagenet":
        try:
            import torchvision  # only here: see ResNet18Trunk

            sd = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # network failures surface as many exception types
            raise CavgaError(
                f"could not download torchvision's ImageNet ResNet-18 weights ({e}); "
                "download them on a machine with internet access and pass the file with --weights PATH"
            ) from e
        return {k: v for k, v in sd.items() if not k.startswith("fc.")}
    path = Path(weights)
    if not path.is_file():
        raise CavgaError(f"ResNet-18 weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CavgaError(f"cannot read ResNet-18 weights from {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CavgaError(f"{path} does not hold a state dict")
    with torch.device("meta"):  # shapes only: no memory, and no draw from the random stream
        reference = ResNet18Trunk().state_dict()
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith("fc.")}
    missing = [k for k in reference if k not in sd]
    wrong = [k for k, v in sd.items() if k in reference and tuple(v.shape) != tuple(reference[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shape for {wrong[:3]}"
        raise CavgaError(f"{path} is not a torchvision ResNet-18 state dict: {detail}")
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
