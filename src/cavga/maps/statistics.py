"""`latent-stats`: Mahalanobis distance of each position's encoder features from Gaussian statistics
of the normal training images, summed over stages."""

from __future__ import annotations

import math

import torch

from cavga.attention import upsample
from cavga.config import TrainConfig
from cavga.maps.common import Images, available_layers, batches, blur, forward, layer
from cavga.maps.registry import Fitter, MapContext, MapSpec, register_map
from cavga.networks import CAVGA, ModelOutput


class StatsFitter(Fitter):
    """Per stage: a mean per position, shrunk towards the mean over all positions (`position_shrink`;
    textures are stationary, objects are aligned, and few images make per-position means noisy), and
    one covariance pooled over positions, so 50 images give a well-conditioned K×K estimate."""

    def __init__(self, model: CAVGA, cfg: TrainConfig, n_images: int = 0):
        self.cfg = cfg
        self.acc: dict[str, dict] = {}
        self.n = 0

    def update(self, x: torch.Tensor, out: ModelOutput) -> None:
        self.n += len(x)
        for name in available_layers(out, self.cfg.stats_layers):
            f = layer(out, name, self.cfg.stats_pool).double()  # (B, K, h, w)
            flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B·h·w, K)
            a = self.acc.setdefault(name, {"pos": 0, "sum": 0, "outer": 0})
            a["pos"] = a["pos"] + f.sum(0)
            a["sum"] = a["sum"] + flat.sum(0)
            a["outer"] = a["outer"] + flat.T @ flat

    def accumulated(self) -> object:
        return self.n, {name: {k: v.cpu() for k, v in a.items()} for name, a in self.acc.items()}

    def merge(self, accumulated: list) -> None:
        for n, acc in accumulated:
            self.n += n
            for name, a in acc.items():
                mine = self.acc.setdefault(name, {"pos": 0, "sum": 0, "outer": 0})
                for k, v in a.items():
                    mine[k] = mine[k] + (v.to(mine[k].device) if torch.is_tensor(mine[k]) else v)

    def finish(self) -> dict:
        stats = {}
        for name, a in self.acc.items():
            K, h, w = a["pos"].shape
            count = self.n * h * w
            mean = a["sum"] / count
            cov = a["outer"] / count - torch.outer(mean, mean)
            # Ledoit-Wolf-like ridge so the inverse exists with few images and dead channels.
            cov += (0.01 * torch.trace(cov) / K + 1e-6) * torch.eye(K, dtype=cov.dtype, device=cov.device)
            shrink = self.cfg.position_shrink
            pos_mean = (1 - shrink) * a["pos"] / self.n + shrink * mean.view(K, 1, 1)
            stats[name] = {"mean": pos_mean.float(), "precision": torch.linalg.inv(cov).float()}
        return stats


@torch.no_grad()
def fit_feature_stats(model: CAVGA, images: Images, cfg: TrainConfig, device: torch.device) -> dict:
    """Gaussian statistics of the chosen encoder stages over normal images (see `StatsFitter`)."""
    model.eval()
    fitter = StatsFitter(model, cfg)
    for xb in batches(images, cfg.batch_size):
        xb = xb.to(device)
        fitter.update(xb, forward(model, cfg, xb, features_only=True))
    return fitter.finish()


def feature_deviation(out: ModelOutput, stats: dict, size: int, pool: int) -> torch.Tensor:
    """Sum over stages of the Mahalanobis distance per position, each stage scaled by √K."""
    total = 0
    for name, s in stats.items():
        d = layer(out, name, pool) - s["mean"]  # (B, K, h, w)
        m = torch.einsum("bkhw,kl,blhw->bhw", d, s["precision"], d).clamp_min(0).sqrt()
        total = total + upsample(m / math.sqrt(d.shape[1]), size)
    return total


def _latent_stats(ctx: MapContext) -> tuple[torch.Tensor, None]:
    m = feature_deviation(ctx.out, ctx.fitted["latent-stats"], ctx.size, ctx.cfg.stats_pool)
    return blur(m, ctx.cfg), None


register_map(
    MapSpec(
        "latent-stats",
        "Mahalanobis distance of each position's encoder features from normal statistics, fused over scales",
        _latent_stats,
        fitter=StatsFitter,
        features_only=True,
    )
)
