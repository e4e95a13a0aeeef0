"""The CAVGA network (encoder → convolutional z → decoder, plus a discriminator) and its registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cavga.errors import CavgaError
from cavga.networks.blocks import ConvLatent, DCGANDiscriminator, init_dcgan_weights, reparameterize
from cavga.networks.dcgan import DCGANDecoder, DCGANEncoder
from cavga.networks.resnet import ResidualDecoder, ResNetEncoder


@dataclass
class ModelOutput:
    """What one forward pass gives; shapes for a batch of B images of C×H×W."""

    features: dict[int, torch.Tensor]  # encoder stages keyed by stride
    F: torch.Tensor  # (B, K, h, w) last encoder stage, the Grad-CAM feature map
    mu: torch.Tensor  # (B, Z, h, w)
    logvar: torch.Tensor  # (B, Z, h, w)
    z: torch.Tensor  # (B, Z, h, w)
    logits: torch.Tensor  # (B, C, H, W) decoder output before the sigmoid
    recon: torch.Tensor  # (B, C, H, W) x̂ in [0, 1]


class CAVGA(nn.Module):
    """Convolutional adversarial VAE: encoder E, latent heads, decoder G and discriminator Dis."""

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        latent: nn.Module,
        decoder: nn.Module,
        discriminator: nn.Module,
    ):
        super().__init__()
        self.name = name
        self.encoder = encoder
        self.latent = latent
        self.decoder = decoder
        self.discriminator = discriminator

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of E, the latent heads and G (the discriminator has its own optimizer)."""
        return [p for m in (self.encoder, self.latent, self.decoder) for p in m.parameters()]

    def forward(self, x: torch.Tensor, sample: bool | None = None) -> ModelOutput:
        """Encode, sample z (while training unless `sample` says otherwise) and decode."""
        sample = self.training if sample is None else sample
        feats = self.encoder(x)
        F = feats[max(feats)]
        mu, logvar = self.latent(F)
        z = reparameterize(mu, logvar, sample)
        logits = self.decoder(z)
        return ModelOutput(feats, F, mu, logvar, z, logits, torch.sigmoid(logits))


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and what it is."""

    name: str
    backbone: str  # "resnet" or "dcgan"
    setting: str  # "unsupervised" (weakly supervised models come with the CAVGA-w work)
    description: str
    build: Callable[..., CAVGA]


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, backbone: str, setting: str, description: str):
    """Decorator: add a factory to MODELS under `name`."""

    def wrap(fn: Callable[..., CAVGA]) -> Callable[..., CAVGA]:
        MODELS[name] = ModelSpec(name, backbone, setting, description, fn)
        return fn

    return wrap


def check_image_size(backbone: str, image_size: int) -> None:
    """R needs a multiple of 32; D a power of two ≥ 32 (its stack halves down to 4×4)."""
    if backbone == "resnet" and (image_size < 32 or image_size % 32):
        raise CavgaError(f"CAVGA-R needs an image size that is a multiple of 32 (got {image_size})")
    if backbone == "dcgan" and (image_size < 32 or image_size & (image_size - 1)):
        raise CavgaError(f"CAVGA-D needs an image size that is a power of two ≥ 32 (got {image_size})")


@register_model(
    "cavga-ru",
    "resnet",
    "unsupervised",
    "CAVGA-Ru: ResNet-18 encoder, conv z, residual decoder, DCGAN discriminator",
)
def cavga_ru(
    image_size: int,
    channels: int,
    latent_channels: int = 512,
    weights: str | None = None,
    disc_width: int = 64,
) -> CAVGA:
    check_image_size("resnet", image_size)
    enc = ResNetEncoder(channels, weights)
    dis = DCGANDiscriminator(channels, image_size, disc_width)
    dec = ResidualDecoder(latent_channels, channels)
    init_dcgan_weights(dis)
    return CAVGA("cavga-ru", enc, ConvLatent(enc.out_channels, latent_channels), dec, dis)


@register_model(
    "cavga-du",
    "dcgan",
    "unsupervised",
    "CAVGA-Du: DCGAN encoder and generator, conv z, DCGAN discriminator",
)
def cavga_du(
    image_size: int,
    channels: int,
    latent_channels: int = 256,
    weights: str | None = None,
    disc_width: int = 64,
    width: int = 64,
) -> CAVGA:
    check_image_size("dcgan", image_size)
    if weights:
        raise CavgaError("--weights applies to the ResNet-18 encoder of CAVGA-R models only")
    enc = DCGANEncoder(channels, image_size, width)
    dec = DCGANDecoder(latent_channels, channels, image_size, width)
    dis = DCGANDiscriminator(channels, image_size, disc_width)
    net = CAVGA("cavga-du", enc, ConvLatent(enc.out_channels, latent_channels), dec, dis)
    init_dcgan_weights(net)
    return net


def create_model(name: str, image_size: int, channels: int, **kwargs) -> CAVGA:
    """Build a registered model by name (see `MODELS`)."""
    if name not in MODELS:
        raise CavgaError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name].build(image_size, channels, **kwargs)
