"""Anomaly maps: the paper's attention and ours, calibrated on normal images only.

Every map is (B, H, W) at the input size. Maps other than `paper` are calibrated: a raw map r is
divided by its 99th percentile on held-out normal images, then squashed to [0, 1) as r / (1 + r),
so 0.5 means "as unusual as the top 1 % of normal pixels" and the paper's 0.5 cut becomes a
threshold set without any anomalous image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from cavga.attention import (
    advae_attention,
    inference_attention,
    inference_class_attention,
    multiscale_attention,
    nearest_stride,
    upsample,
)
from cavga.config import TrainConfig
from cavga.losses import ssim_map
from cavga.networks import CAVGA, MODELS, ModelOutput

MAPS: dict[str, str] = {
    "paper": "the model's own map as its paper defines it: 1 − A for CAVGA-u, A^anomalous for CAVGA-w, "
    "the residual or 1 − SSIM for the autoencoders, the ADVAE attention for VAE-grad (see `cavga models`)",
    "latent-stats": "Mahalanobis distance of each position's encoder features from normal statistics, "
    "fused over scales",
    "fusion": "mean of the calibrated latent-stats and residual maps",
    "gradcam-multiscale": "1 − A, A the paper's Grad-CAM of Σz taken at strides 8, 16 and 32, averaged",
    "gradcam-kl": "Grad-CAM of the image's KL term (non-linear in z) at strides 8, 16 and 32, averaged",
    "gradcam-recon": "Grad-CAM of the image's reconstruction error at strides 8, 16 and 32, averaged",
    "residual": "|x − x̂| averaged over channels and smoothed (reference)",
}
GRADCAM_STRIDES = (8, 16, 32)
# Maps that pass through the normal-image calibration (raw value / normal 99th percentile).
CALIBRATED = ("latent-stats", "residual", "fusion")
SCALE_QUANTILE = 0.99


def available_maps(model: CAVGA) -> tuple[str, ...]:
    """The maps a model can make: the KL Grad-CAM needs a variational latent."""
    return tuple(n for n in MAPS if not (n == "gradcam-kl" and model.latent.logvar is None))


def paper_map(
    model: CAVGA, x: torch.Tensor, out: ModelOutput, residual_score: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own map as published, (B, H, W), its image score (B,) and the attention to show
    in panels (B, H, W): see `PAPER_MAPS` in cavga.networks.model. `residual_score` is the paper's
    image score s_a = mean |x − x̂|, which CAVGA-u and VAE-grad use."""
    kind, size = MODELS[model.name].paper_map, x.shape[-1]
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
    else:
        raise ValueError(f"unknown paper map {kind!r}")
    return m, m.flatten(1).mean(1), m


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def _blur(maps: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    sigma = cfg.blur * cfg.image_size
    if sigma <= 0:
        return maps
    k = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(maps.unsqueeze(1), [k, k], [sigma, sigma]).squeeze(1)


def _quantile(t: torch.Tensor, q: float) -> float:
    # torch.quantile refuses very large inputs; a strided subsample of ≤ 4M values is plenty.
    flat = t.flatten().float()
    return float(torch.quantile(flat[:: max(1, flat.numel() // 4_000_000)], q))


def _layer(out: ModelOutput, name: str, pool: int = 1) -> torch.Tensor:
    f = out.mu if name == "z" else out.features[int(name.removeprefix("s"))]
    if pool > 1:
        # Average over each position's neighbourhood: texture defects (a contrast change, a foreign
        # patch) alter local statistics more than any single position's features.
        f = F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False)
    return f


def _available_layers(out: ModelOutput, names: tuple[str, ...]) -> list[str]:
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


@torch.no_grad()
def fit_feature_stats(model: CAVGA, images: torch.Tensor, cfg: TrainConfig, device: torch.device) -> dict:
    """Gaussian statistics of the chosen encoder stages over normal training images.

    Per stage: a mean per position, shrunk towards the mean over all positions (`position_shrink`;
    textures are stationary, objects are aligned, and few images make per-position means noisy), and
    one covariance pooled over positions, so 50 images give a well-conditioned K×K estimate.
    """
    model.eval()
    acc: dict[str, dict[str, torch.Tensor]] = {}
    n = 0
    for xb in _batches(images, cfg.batch_size):
        out = model(xb.to(device), sample=False)
        n += len(xb)
        for name in _available_layers(out, cfg.stats_layers):
            f = _layer(out, name, cfg.stats_pool).double()  # (B, K, h, w)
            flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B·h·w, K)
            a = acc.setdefault(name, {"pos": 0, "sum": 0, "outer": 0})
            a["pos"] = a["pos"] + f.sum(0)
            a["sum"] = a["sum"] + flat.sum(0)
            a["outer"] = a["outer"] + flat.T @ flat
    stats = {}
    for name, a in acc.items():
        K, h, w = a["pos"].shape
        count = n * h * w
        mean = a["sum"] / count
        cov = a["outer"] / count - torch.outer(mean, mean)
        # Ledoit-Wolf-like ridge so the inverse exists with few images and dead channels.
        cov += (0.01 * torch.trace(cov) / K + 1e-6) * torch.eye(K, dtype=cov.dtype, device=cov.device)
        pos_mean = (1 - cfg.position_shrink) * a["pos"] / n + cfg.position_shrink * mean.view(K, 1, 1)
        stats[name] = {"mean": pos_mean.float(), "precision": torch.linalg.inv(cov).float()}
    return stats


def feature_deviation(out: ModelOutput, stats: dict, size: int, pool: int) -> torch.Tensor:
    """Sum over stages of the Mahalanobis distance per position, each stage scaled by √K."""
    total = 0
    for name, s in stats.items():
        d = _layer(out, name, pool) - s["mean"]  # (B, K, h, w)
        m = torch.einsum("bkhw,kl,blhw->bhw", d, s["precision"], d).clamp_min(0).sqrt()
        total = total + upsample(m / math.sqrt(d.shape[1]), size)
    return total


def _fuse(res: dict[str, torch.Tensor], scales: dict[str, float]) -> torch.Tensor:
    # Each map divided by its own normal 99th percentile: weights set on normal images only.
    return 0.5 * (res["latent-stats"] / scales["latent-stats"] + res["residual"] / scales["residual"])


class MapMaker:
    """Computes reconstructions, the attention and every anomaly map for batches of images."""

    def __init__(
        self,
        model: CAVGA,
        cfg: TrainConfig,
        calibration: dict | None,
        device: torch.device,
        maps: tuple[str, ...] | None = None,
    ):
        self.model, self.cfg, self.cal, self.device = model, cfg, calibration, device
        self.maps = tuple(n for n in available_maps(model) if maps is None or n in maps)

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Uncalibrated maps plus `recon` (B,C,H,W), `attention` (B,H,W) and `residual_score` (B,)."""
        self.model.eval()
        x = x.to(self.device)
        size = x.shape[-1]
        out = self.model(x, sample=False)
        diff = (x - out.recon).abs()
        residual_score = diff.flatten(1).mean(1)  # the paper's image score s_a
        paper, paper_score, attention = paper_map(self.model, x, out, residual_score)
        res = {
            "recon": out.recon,
            "attention": attention,  # (B, H, W)
            "paper": paper,
            "paper_score": paper_score,
            "residual": _blur(diff.mean(1), self.cfg),
            "residual_score": residual_score,
        }
        if out.class_logits is not None:
            res["class_probability"] = torch.softmax(out.class_logits, 1)[:, 1]
        # The Grad-CAM variants each cost a backward pass: computed only when asked for.
        for name, score in (
            ("gradcam-multiscale", "sum-z"),
            ("gradcam-kl", "kl"),
            ("gradcam-recon", "recon"),
        ):
            if name in self.maps:
                a = multiscale_attention(self.model, x, score, GRADCAM_STRIDES)[0]
                res[name] = 1.0 - a if score == "sum-z" else a
        if self.cal is not None and ("latent-stats" in self.maps or "fusion" in self.maps):
            res["latent-stats"] = _blur(
                feature_deviation(out, self.cal["stats"], size, self.cfg.stats_pool), self.cfg
            )
        return res

    def calibrated(self, res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From `raw` output: the fusion, calibrated maps in [0, 1], one score per map (`score/<map>`)."""
        res = dict(res)
        if self.cal is not None and "latent-stats" in res and "latent-stats" in self.cal["scales"]:
            res["fusion"] = _fuse(res, self.cal["scales"])
        for name in CALIBRATED:
            if self.cal is not None and name in res and name in self.cal["scales"]:
                r = res[name] / self.cal["scales"][name]
                res[name] = r / (1 + r)
        for name in MAPS:
            if name in res:
                # Each paper map comes with its paper's image score; our calibrated maps score by their
                # peak; the Grad-CAM maps are scaled per image (every image peaks at 1), so they take the
                # paper's reconstruction-error score s_a.
                if name == "paper":
                    score = res["paper_score"]
                elif name in CALIBRATED:
                    score = res[name].flatten(1).amax(1)
                else:
                    score = res["residual_score"]
                res[f"score/{name}"] = score
        return res

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated maps in [0, 1] and one image score per map (`score/<map>`)."""
        return self.calibrated(self.raw(x))


@torch.no_grad()
def calibrate(
    model: CAVGA,
    cfg: TrainConfig,
    train_images: torch.Tensor,
    calib_images: torch.Tensor,
    device: torch.device,
) -> dict:
    """Normal statistics from the training images; scales and thresholds from held-out normal images.

    No anomalous image is used. Also stores each map's mean over the training images: the
    image-independent reference map that evaluation reports beside the real one.
    """
    cal: dict = {"stats": fit_feature_stats(model, train_images, cfg, device), "scales": {}}
    maker = MapMaker(model, cfg, cal, device)
    held = [maker.raw(xb) for xb in _batches(calib_images, cfg.batch_size)]
    for name in ("latent-stats", "residual"):
        cal["scales"][name] = _quantile(torch.cat([h[name] for h in held]), SCALE_QUANTILE) + 1e-12
    fused = torch.cat([_fuse(h, cal["scales"]) for h in held])
    cal["scales"]["fusion"] = _quantile(fused, SCALE_QUANTILE) + 1e-12
    # Image thresholds and the image-independent reference maps.
    calib_out = [maker.calibrated(h) for h in held]
    train_out = [maker(xb) for xb in _batches(train_images, cfg.batch_size)]
    cal["image_thresholds"] = {}
    cal["mean_maps"] = {}
    for name in maker.maps:
        scores = torch.cat([o[f"score/{name}"] for o in calib_out])
        cal["image_thresholds"][name] = _quantile(scores, 1 - cfg.false_alarm_rate)
        cal["mean_maps"][name] = torch.cat([o[name] for o in train_out]).mean(0).cpu()
    return cal
