"""The training-free anchors' "encoder": raw pixel patches of the standardised image, no weights.

With it a `CAVGA` module has no latent, decoder or discriminator; the memory and nearest-image maps
then compare raw pixels, which is what a method that learns nothing can do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Each image to zero mean and unit variance over its pixels and channels: a brighter or darker
    exposure of the same part is the same part."""
    flat = x.flatten(1)
    std = flat.std(1) if flat.shape[1] > 1 else torch.ones(len(x), device=x.device)
    return (x - flat.mean(1).view(-1, 1, 1, 1)) / (std.view(-1, 1, 1, 1) + 1e-6)


class RawPatches(nn.Module):
    """Every p×p patch of the standardised image (p = image size / 16, at least 4), at stride p/2,
    as one feature vector of C·p² values per position: (B, C·p², H/(p/2), W/(p/2))."""

    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        self.patch = max(4, image_size // 16)
        self.stride = self.patch // 2
        self.out_channels = in_channels * self.patch**2

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        B, _, H, W = x.shape
        # Padding p/4 on each side gives exactly H / stride positions per axis.
        u = F.unfold(standardize(x), self.patch, stride=self.stride, padding=self.patch // 4)
        return {self.stride: u.view(B, self.out_channels, H // self.stride, W // self.stride)}
