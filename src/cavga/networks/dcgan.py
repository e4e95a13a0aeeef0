"""CAVGA-D: DCGAN encoder (discriminator body) and DCGAN generator as decoder."""

from __future__ import annotations

import torch
from torch import nn

from cavga.networks.blocks import dcgan_body, dcgan_generator


class DCGANEncoder(nn.Module):
    """DCGAN discriminator body; returns every stage's feature map keyed by stride (last: 4×4)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64):
        super().__init__()
        self.body = dcgan_body(in_channels, image_size, width)
        self.out_channels = self.body.out_channels
        self.stride = image_size // 4

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        feats, h, stride = {}, x, 1
        for m in self.body:
            h = m(h)
            if isinstance(m, nn.LeakyReLU):
                stride *= 2
                feats[stride] = h
        return feats


class DCGANDecoder(nn.Module):
    """DCGAN generator from the 4×4 latent grid (returns logits)."""

    def __init__(self, latent_channels: int, out_channels: int, image_size: int, width: int = 64):
        super().__init__()
        self.net = dcgan_generator(latent_channels, out_channels, image_size, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
