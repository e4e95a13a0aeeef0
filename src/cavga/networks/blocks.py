"""Building blocks shared by the CAVGA networks: the latent heads and the DCGAN stacks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class ConvLatent(nn.Module):
    """Convolutional latent: 1×1 convs give μ and log σ² on the encoder's h×w grid.

    Keeping the grid is what lets attention on z point at image regions (the paper's "conv z").
    `variational=False` gives a plain autoencoder's deterministic code (no log σ²).
    """

    def __init__(self, in_channels: int, latent_channels: int, variational: bool = True):
        super().__init__()
        self.mu = nn.Conv2d(in_channels, latent_channels, 1)
        self.logvar = nn.Conv2d(in_channels, latent_channels, 1) if variational else None
        self.out_channels = latent_channels

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logvar = self.logvar(features) if self.logvar is not None else None
        return self.mu(features), logvar  # (B, Z, h, w) each

    def to_grid(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's input: z already is a grid."""
        return z


class FlatLatent(nn.Module):
    """Flattened latent (the paper's ablation R*, and the baselines' bottleneck): flatten F, a fully
    connected layer to a `dim`-d z, and one back to a `out_channels`×h×w grid for the decoder."""

    def __init__(
        self,
        in_channels: int,
        grid: int,
        out_channels: int,
        dim: int = 100,
        variational: bool = True,
    ):
        super().__init__()
        n_in = in_channels * grid * grid
        self.mu = nn.Linear(n_in, dim)
        self.logvar = nn.Linear(n_in, dim) if variational else None
        self.expand = nn.Linear(dim, out_channels * grid * grid)
        self.grid, self.out_channels = grid, out_channels

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        flat = features.flatten(1)
        logvar = self.logvar(flat) if self.logvar is not None else None
        return self.mu(flat), logvar  # (B, dim) each

    def to_grid(self, z: torch.Tensor) -> torch.Tensor:
        return self.expand(z).view(len(z), self.out_channels, self.grid, self.grid)


Noise = Callable[[torch.Size], torch.Tensor]  # ε of a given shape (see `reparameterize`)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor | None, sample: bool, noise: Noise | None = None
) -> torch.Tensor:
    """z = μ + σ·ε while training, z = μ at inference (and always for a deterministic code). ε comes
    from `noise(shape)` when given (training draws it per global batch, so several processes sample
    what one would), else from the global random generator."""
    if not sample or logvar is None:
        return mu
    eps = torch.randn_like(mu) if noise is None else noise(mu.shape).to(mu)
    return mu + torch.exp(0.5 * logvar) * eps


def dcgan_body(in_channels: int, image_size: int, width: int, max_width: int = 512) -> nn.Sequential:
    """DCGAN discriminator body: 4×4 stride-2 convs from image_size down to a 4×4 grid.

    The first conv has no BatchNorm, as in DCGAN. Returns a module whose output has
    `body.out_channels` channels at 4×4.
    """
    n = int(math.log2(image_size // 4))
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(n):
        c_out = min(width * 2**i, max_width)
        layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0))
        if i > 0:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        c_in = c_out
    body = nn.Sequential(*layers)
    body.out_channels = c_in  # type: ignore[attr-defined]
    return body


def dcgan_generator(
    in_channels: int, out_channels: int, image_size: int, width: int, max_width: int = 512
) -> nn.Sequential:
    """DCGAN generator: 4×4 stride-2 transposed convs from a 4×4 grid up to image_size (logits)."""
    n = int(math.log2(image_size // 4))
    widths = [min(width * 2**i, max_width) for i in reversed(range(n - 1))]  # e.g. 256, 128, 64
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in widths:
        layers += [
            nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(True),
        ]
        c_in = c_out
    layers.append(nn.ConvTranspose2d(c_in, out_channels, 4, 2, 1))
    return nn.Sequential(*layers)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: the body, then a 4×4 conv to one logit per image."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64):
        super().__init__()
        self.body = dcgan_body(in_channels, image_size, width)
        self.head = nn.Conv2d(self.body.out_channels, 1, 4, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).flatten()  # (B,)


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) convs, N(1, 0.02) BatchNorm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
