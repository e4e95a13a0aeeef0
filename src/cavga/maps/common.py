"""Helpers the map families share: smoothing, quantiles, batching and encoder-stage lookup."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from cavga.attention import nearest_stride
from cavga.config import TrainConfig
from cavga.heap import release_free_memory
from cavga.networks import CAVGA, ModelOutput
from cavga.networks.anchor import standardize
from cavga.networks.resnet import ResNetEncoder, stages_reading


class ImageBatches(Protocol):
    """Images decoded as they are needed (`cavga.data.stream.ImageSource`)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]: ...

    def subset(self, indices: Sequence[int]) -> ImageBatches: ...


Images = torch.Tensor | ImageBatches  # (N, C, H, W) in [0, 1], or batches of them


def batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of at most `batch_size` images: slices of a tensor, or the float batches of
    an `ImageSource` (images decoded as they are needed)."""
    if not isinstance(images, torch.Tensor):
        yield from images.batches(batch_size)
        return
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def share(images: Images, rank: int, world_size: int) -> Images:
    """Rank `rank`'s share of the images when `world_size` processes split them: every
    `world_size`-th image from the `rank`-th."""
    if world_size == 1:
        return images
    if isinstance(images, torch.Tensor):
        return images[rank::world_size]
    return images.subset(range(rank, len(images), world_size))


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)` along the first dimension, emptying `parts` as they are copied and giving
    their memory back every 32 MB (`cavga.heap`), so the parts and the whole are never all resident
    at once (a fitter's parts are its whole bank: all training images at 64 px for `nearest-image`)."""
    out = parts[0].new_empty((sum(len(p) for p in parts), *parts[0].shape[1:]))
    done = copied = 0
    parts.reverse()  # popped from the end, so in their order
    while parts:
        part = parts.pop()
        out[done : done + len(part)] = part
        done, copied = done + len(part), copied + part.nbytes
        del part
        if copied > 32 << 20:
            release_free_memory()
            copied = 0
    return out


def blur(maps: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Gaussian smoothing of (B, H, W) maps, σ = cfg.blur × image size (0: none)."""
    sigma = cfg.blur * cfg.image_size
    if sigma <= 0:
        return maps
    return gaussian_blur(maps.unsqueeze(1), 2 * math.ceil(2 * sigma) + 1, sigma).squeeze(1)


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) smoothed by a `size`-tap Gaussian of σ = `sigma`, borders reflected: what
    torchvision's `gaussian_blur` computes (a test checks it), as two 1-D passes, and without
    importing torchvision (see `cavga.networks.resnet.ResNet18Trunk`)."""
    half = (size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, size, device=x.device) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.dtype)
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(F.conv2d(x, taps.view(1, 1, 1, size)), taps.view(1, 1, size, 1))


# torch.quantile refuses very large inputs; a strided subsample of about this many values is plenty.
QUANTILE_VALUES = 4_000_000


def quantile(t: torch.Tensor, q: float) -> float:
    """The q-quantile of every value of `t`."""
    flat = t.flatten().float()
    return float(torch.quantile(flat[:: max(1, flat.numel() // QUANTILE_VALUES)], q))


class Tail:
    """`quantile` of a stream of tensors whose total number of values is known, without holding them:
    only the largest values, as many as the quantile's interpolation can reach, are kept. Fed the
    parts of a tensor in order, `value()` equals `quantile` of the whole tensor exactly."""

    def __init__(self, total: int, q: float):
        self.q, self.seen = q, 0
        self.stride = max(1, total // QUANTILE_VALUES)
        self.n = len(range(0, total, self.stride))  # values `quantile` would sort
        # Values at or above the lower interpolation point, plus two against rounding in its rank.
        self.keep = min(self.n, self.n - math.floor(q * (self.n - 1)) + 2)
        self.top = torch.empty(0)

    def update(self, t: torch.Tensor) -> None:
        """The next part of the stream (flattened in order, as `quantile` flattens the whole)."""
        flat = t.detach().flatten().float().cpu()
        picked = flat[(-self.seen) % self.stride :: self.stride]
        self.seen += flat.numel()
        both = torch.cat([self.top, picked])
        self.top = both.topk(min(self.keep, len(both)), sorted=False).values

    def value(self) -> float:
        """The quantile of everything fed so far (all `total` values)."""
        if self.seen == 0:
            raise ValueError("Tail.value: nothing was fed")
        # The values below the kept ones only fill positions the interpolation does not read.
        fill = self.top.min().expand(self.n - len(self.top))
        return float(torch.quantile(torch.cat([fill, self.top]), self.q))


def layer(out: ModelOutput, name: str, pool: int = 1) -> torch.Tensor:
    """An encoder stage by name ("s8" = stride 8, "z" = μ), averaged over each position's
    pool × pool neighbourhood when pool > 1."""
    f = out.mu if name == "z" else out.features[int(name.removeprefix("s"))]
    if pool > 1:
        # Texture defects (a contrast change, a foreign patch) alter local statistics more than any
        # single position's features.
        f = F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False)
    return f


def available_layers(out: ModelOutput, names: tuple[str, ...]) -> list[str]:
    """The requested stages, each moved to the nearest stride the encoder has, without repeats.

    Small inputs to CAVGA-D have fewer stages (a 32 px input stops at stride 8).
    """
    found: list[str] = []
    for name in names:
        if name != "z":
            name = f"s{nearest_stride(out.features, int(name.removeprefix('s')))}"
        if name not in found:
            found.append(name)
    return found


def forward(model: CAVGA, cfg: TrainConfig, x: torch.Tensor, features_only: bool = False) -> ModelOutput:
    """One forward pass at z = μ for the maps. With `feature_input = "standardised"` the encoder
    stages the maps read come from each image standardised to zero mean and unit variance, so a
    brighter or darker part gives the same features; the reconstruction still sees `x`.

    `features_only`: only the encoder stages the maps read are needed (fitting the normal states, or
    predicting with a map of those stages), so the latent heads, the decoder and a ResNet's deeper
    stages are skipped, and with standardised input the encoder runs once instead of twice; the
    other fields are None. Not when a map reads z (a "z" stage), which needs μ.

    The model's extra encoders (`TrainConfig.feature_encoders`) see the same input as the stages, and
    theirs are concatenated to them (`with_extra_encoders`).
    """
    seen = standardize(x) if cfg.feature_input == "standardised" else x
    read = (*cfg.stats_layers, *cfg.memory_layers)
    if features_only and "z" not in read:
        if isinstance(model.encoder, ResNetEncoder):
            feats = model.encoder(seen, stages_reading(read))
        else:
            feats = model.encoder(seen)
        out = ModelOutput(feats, feats[max(feats)], None, None, None, None, None)
    else:
        out = model(x, sample=False)
        if cfg.feature_input == "standardised":
            out = dataclasses.replace(out, features=model.encoder(seen))
    if len(model.extra_encoders):
        out = dataclasses.replace(out, features=with_extra_encoders(model, seen, out.features))
    return out


def with_extra_encoders(
    model: CAVGA, x: torch.Tensor, feats: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """The encoder's stages `feats` with each extra encoder's stage of the same stride (computed from
    `x`) concatenated after it, channel-wise; the strides they lack are left as they are."""
    extra = [encoder(x) for encoder in model.extra_encoders]
    return {s: torch.cat([f, *(e[s] for e in extra if s in e)], 1) for s, f in feats.items()}
