"""The CAVGA network (encoder → z → decoder, discriminator, classifier), and the registry of every
model: the four CAVGA variants, the paper's ablations and the baselines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cavga.errors import CavgaError
from cavga.networks.anchor import RawPatches
from cavga.networks.blocks import (
    ConvLatent,
    DCGANDiscriminator,
    FlatLatent,
    Noise,
    init_dcgan_weights,
    reparameterize,
)
from cavga.networks.dcgan import DCGANDecoder, DCGANEncoder
from cavga.networks.resnet import ResidualDecoder, ResNetEncoder


@dataclass
class ModelOutput:
    """What one forward pass gives; shapes for a batch of B images of C×H×W."""

    features: dict[int, torch.Tensor]  # encoder stages keyed by stride
    F: torch.Tensor  # (B, K, h, w) last encoder stage, the Grad-CAM feature map
    mu: torch.Tensor  # (B, Z, h, w) for a convolutional z, (B, Z) for a flattened one
    logvar: torch.Tensor | None  # like mu; None for a plain (deterministic) autoencoder
    z: torch.Tensor  # like mu
    logits: torch.Tensor  # (B, C, H, W) decoder output before the sigmoid
    recon: torch.Tensor  # (B, C, H, W) x̂ in [0, 1]
    class_logits: torch.Tensor | None = None  # (B, 2) [normal, anomalous] from C, weakly supervised only


class CAVGA(nn.Module):
    """Adversarial VAE: encoder E, latent heads, decoder G, and optionally the discriminator Dis and
    the classifier C on the flattened z (weakly supervised). The baselines are the same module with
    parts left out, so every model goes through one engine."""

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        latent: nn.Module | None,
        decoder: nn.Module | None,
        discriminator: nn.Module | None = None,
        classifier: nn.Module | None = None,
    ):
        super().__init__()
        self.name = name
        self.encoder = encoder
        self.latent = latent
        self.decoder = decoder
        self.discriminator = discriminator
        self.classifier = classifier
        # Further encoders whose stages the maps read beside the encoder's (`TrainConfig.
        # feature_encoders`, `cavga.networks.resnet.seeded_stages`); no CAVGA step trains them.
        self.extra_encoders = nn.ModuleList()

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of E, the latent heads, G and C (the discriminator has its own optimizer); none
        for a training-free anchor."""
        parts = (self.encoder, self.latent, self.decoder, self.classifier)
        return [p for m in parts if m is not None for p in m.parameters()]

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """C: z (a clone, flattened to z_fc, so gradients still reach the encoder) → 2 logits."""
        assert self.classifier is not None
        return self.classifier(z.flatten(1))

    def forward(self, x: torch.Tensor, sample: bool | None = None, noise: Noise | None = None) -> ModelOutput:
        """Encode, sample z (while training unless `sample` says otherwise; ε from `noise` when
        given) and decode."""
        sample = self.training if sample is None else sample
        feats = self.encoder(x)
        F = feats[max(feats)]
        if self.latent is None or self.decoder is None:
            # A training-free anchor: its features are everything; it reconstructs nothing (x̂ = x).
            return ModelOutput(feats, F, F, None, F, x, x)
        mu, logvar = self.latent(F)
        z = reparameterize(mu, logvar, sample, noise)
        logits = self.decoder(self.latent.to_grid(z))
        class_logits = self.classify(z) if self.classifier is not None else None
        return ModelOutput(feats, F, mu, logvar, z, logits, torch.sigmoid(logits), class_logits)


# How each model's own anomaly map (the map named "paper") is made; see cavga.maps.
PAPER_MAPS = {
    "attention-u": "1 − A, A the Grad-CAM of Σz on the last encoder stage (CAVGA-u)",
    "attention-w": "A^anomalous, the Grad-CAM of C's anomalous logit on z (CAVGA-w)",
    "l2": "squared residual (x − x̂)² averaged over channels (AE-L2)",
    "ssim": "1 − SSIM(x, x̂), 11×11 Gaussian window σ 1.5, averaged over channels (AE-SSIM)",
    "advae": "mean over latent dimensions of the Grad-CAM of each z_i on the last encoder stage (ADVAE)",
    # The training-free anchors' own maps are registered maps (see cavga.maps.memory).
    "memory": "raw-patch nearest neighbour per position (knn-patches)",
    "nearest-image": "|x − nearest normal training image|, scored by their distance (knn-pixels)",
}


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, what it is, and the training settings it implies."""

    name: str
    backbone: str  # "resnet" or "dcgan"
    # "unsupervised", "weakly-supervised" (uses a few labelled anomalous images), "self-supervised"
    # (normal images and synthetic anomalies made from them) or "training-free"
    setting: str
    description: str
    build: Callable[..., CAVGA]
    paper_map: str  # key of PAPER_MAPS
    config: dict = field(default_factory=dict)  # TrainConfig values the model implies (loss, weights)
    family: str = "cavga"  # "cavga", "ablation", "baseline" or "anchor"


MODELS: dict[str, ModelSpec] = {}


def check_image_size(backbone: str, image_size: int) -> None:
    """R needs a multiple of 32; D a power of two ≥ 32 (its stack halves down to 4×4); the raw-patch
    anchors a multiple of 16 (their patches tile the image)."""
    if backbone == "raw" and (image_size < 16 or image_size % 16):
        raise CavgaError(f"the anchors need an image size that is a multiple of 16 (got {image_size})")
    if backbone == "resnet" and (image_size < 32 or image_size % 32):
        raise CavgaError(f"CAVGA-R needs an image size that is a multiple of 32 (got {image_size})")
    if backbone == "dcgan" and (image_size < 32 or image_size & (image_size - 1)):
        raise CavgaError(f"CAVGA-D needs an image size that is a power of two ≥ 32 (got {image_size})")


def build_network(
    name: str,
    backbone: str,
    image_size: int,
    channels: int,
    *,
    flat: bool = False,
    variational: bool = True,
    adversarial: bool = True,
    weakly: bool = False,
    latent_channels: int | None = None,
    latent_dim: int = 100,
    weights: str | None = None,
    disc_width: int = 64,
    width: int = 64,
) -> CAVGA:
    """Assemble a network: ResNet-18 or DCGAN encoder, a convolutional or flattened (`flat`, 100-d)
    latent, the matching decoder, a discriminator when `adversarial`, the classifier C when `weakly`."""
    check_image_size(backbone, image_size)
    if backbone == "raw":
        return CAVGA(name, RawPatches(channels, image_size), None, None)
    if backbone == "resnet":
        enc: nn.Module = ResNetEncoder(channels, weights)
        latent_channels = latent_channels or 512
        dec: nn.Module = ResidualDecoder(latent_channels, channels)
    else:
        if weights:
            raise CavgaError("--weights applies to the ResNet-18 encoder of CAVGA-R models only")
        enc = DCGANEncoder(channels, image_size, width)
        latent_channels = latent_channels or 256
        dec = DCGANDecoder(latent_channels, channels, image_size, width)
    grid = image_size // enc.stride
    if flat:
        latent: nn.Module = FlatLatent(enc.out_channels, grid, latent_channels, latent_dim, variational)
        z_size = latent_dim
    else:
        latent = ConvLatent(enc.out_channels, latent_channels, variational)
        z_size = latent_channels * grid * grid
    dis = DCGANDiscriminator(channels, image_size, disc_width) if adversarial else None
    clf = nn.Linear(z_size, 2) if weakly else None
    net = CAVGA(name, enc, latent, dec, dis, clf)
    # DCGAN initialisation everywhere except a ResNet encoder, whose own init (or ImageNet weights) stays.
    for part in (dis,) if backbone == "resnet" else (net,):
        if part is not None:
            init_dcgan_weights(part)
    return net


def register_model(
    name: str,
    backbone: str,
    setting: str,
    description: str,
    paper_map: str,
    family: str = "cavga",
    config: dict | None = None,
    **arch,
) -> None:
    """Add a model to MODELS: `arch` goes to `build_network`, `config` to the run's TrainConfig."""

    def build(image_size: int, channels: int, **kwargs) -> CAVGA:
        return build_network(name, backbone, image_size, channels, **arch, **kwargs)

    MODELS[name] = ModelSpec(name, backbone, setting, description, build, paper_map, config or {}, family)


U, W = "unsupervised", "weakly-supervised"
NO_CLF = {"w_bce": 0.0, "w_cga": 0.0}
WEAK = {"w_ae": 0.0}  # the weakly supervised objective has L_cga in place of L_ae (paper eq. 6)
# The four CAVGA variants.
register_model(
    "cavga-ru",
    "resnet",
    U,
    "CAVGA-Ru: ResNet-18 encoder, conv z, residual decoder, L_ae",
    "attention-u",
    config=NO_CLF,
)
register_model(
    "cavga-du",
    "dcgan",
    U,
    "CAVGA-Du: DCGAN encoder and generator, conv z, L_ae",
    "attention-u",
    config=NO_CLF,
)
register_model(
    "cavga-rw",
    "resnet",
    W,
    "CAVGA-Rw: CAVGA-R with classifier C on z, L_bce and L_cga",
    "attention-w",
    config=WEAK,
    weakly=True,
)
register_model(
    "cavga-dw",
    "dcgan",
    W,
    "CAVGA-Dw: CAVGA-D with classifier C on z, L_bce and L_cga",
    "attention-w",
    config=WEAK,
    weakly=True,
)
# Self-supervised CAVGA (ours): the weakly supervised branch (C on z, class attention) trained on
# synthetic anomalies made on the fly from the normal images, whose masks are known, so C and the
# attention learn what a defect is without any real anomaly. The decoder restores the clean image.
SELF = {"w_ae": 0.0, "w_bce": 1.0, "w_cga": 1.0, "synthetic": 0.5}
register_model(
    "cavga-rs",
    "resnet",
    "self-supervised",
    "CAVGA-Rs (ours): CAVGA-Rw trained on synthetic anomalies of the normal images, no real anomaly",
    "attention-w",
    config=SELF,
    weakly=True,
)
register_model(
    "cavga-ds",
    "dcgan",
    "self-supervised",
    "CAVGA-Ds (ours): CAVGA-Dw trained on synthetic anomalies of the normal images, no real anomaly",
    "attention-w",
    config=SELF,
    weakly=True,
)
# The paper's Table 8 ablations (all CAVGA-R): flattened 100-d z (R*), and without the attention loss.
register_model(
    "cavga-ru-flat",
    "resnet",
    U,
    "CAVGA-R*u (ablation): flattened 100-d z, L_ae",
    "attention-u",
    "ablation",
    NO_CLF,
    flat=True,
)
register_model(
    "cavga-ru-noae",
    "resnet",
    U,
    "CAVGA-Ru without L_ae (ablation)",
    "attention-u",
    "ablation",
    {**NO_CLF, "w_ae": 0.0},
)
register_model(
    "cavga-ru-flat-noae",
    "resnet",
    U,
    "CAVGA-R*u without L_ae (ablation)",
    "attention-u",
    "ablation",
    {**NO_CLF, "w_ae": 0.0},
    flat=True,
)
register_model(
    "cavga-rw-flat",
    "resnet",
    W,
    "CAVGA-R*w (ablation): flattened 100-d z, L_bce and L_cga",
    "attention-w",
    "ablation",
    WEAK,
    flat=True,
    weakly=True,
)
register_model(
    "cavga-rw-nocga",
    "resnet",
    W,
    "CAVGA-Rw without L_cga (ablation)",
    "attention-w",
    "ablation",
    {**WEAK, "w_cga": 0.0},
    weakly=True,
)
register_model(
    "cavga-rw-flat-nocga",
    "resnet",
    W,
    "CAVGA-R*w without L_cga (ablation)",
    "attention-w",
    "ablation",
    {**WEAK, "w_cga": 0.0},
    flat=True,
    weakly=True,
)
# Baselines the paper compares with, in the same engine (see docs/method.md).
BASELINE = {**NO_CLF, "w_adv": 0.0, "w_ae": 0.0, "anomaly_map": "paper"}
for name, loss, what in (
    ("ae-l2", "l2", "AE-L2 baseline: convolutional autoencoder, 100-d code, L2 loss, squared-residual map"),
    (
        "ae-ssim",
        "ssim",
        "AE-SSIM baseline (Bergmann et al.): the AE-L2 network, SSIM loss, 1 − SSIM map",
    ),
):
    register_model(
        name,
        "dcgan",
        U,
        what,
        loss,  # the map is the loss per pixel
        "baseline",
        {**BASELINE, "w_kl": 0.0, "rec_loss": loss},
        flat=True,
        variational=False,
        adversarial=False,
    )
del name, loss, what
register_model(
    "vae-grad",
    "resnet",
    U,
    "VAE-grad baseline (ADVAE family): ResNet-18 VAE, 100-d z, Grad-CAM attention of every z_i",
    "advae",
    "baseline",
    BASELINE,
    flat=True,
    adversarial=False,
)

# Training-free anchors: what a method that learns nothing reaches on the same data. They keep raw
# pixels and patches only: no gradient histograms, no texture statistics.
ANCHOR = {
    **NO_CLF,
    "w_adv": 0.0,
    "w_ae": 0.0,
    "w_kl": 0.0,
    "memory_pool": 1,
    "gradient_histograms": False,
    "memory_texture": 0.0,
    "memory_position": 0.0,
}
register_model(
    "knn-pixels",
    "raw",
    "training-free",
    "anchor: whole-image nearest neighbour on standardised pixels (map: |x − nearest normal image|)",
    "nearest-image",
    "anchor",
    {**ANCHOR, "anomaly_map": "nearest-image"},
)
register_model(
    "knn-patches",
    "raw",
    "training-free",
    "anchor: raw-patch nearest neighbour per position (patches of 1/16 of the image, coreset memory)",
    "memory",
    "anchor",
    {**ANCHOR, "anomaly_map": "memory"},
)


def create_model(name: str, image_size: int, channels: int, **kwargs) -> CAVGA:
    """Build a registered model by name (see `MODELS`)."""
    if name not in MODELS:
        raise CavgaError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name].build(image_size, channels, **kwargs)
