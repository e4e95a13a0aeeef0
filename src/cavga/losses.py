"""VAE and adversarial losses of CAVGA (each weight is a config value, applied by the engine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    # "sum": per image summed over elements, then averaged over the batch (the paper's L_R and KL);
    # "mean": averaged over every element, which keeps 0.01·L_ae from vanishing beside ~10⁴-sized sums.
    if reduction == "sum":
        return per_element.flatten(1).sum(1).mean()
    if reduction == "mean":
        return per_element.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L_R = −Σ x log x̂ + (1 − x) log(1 − x̂), with x̂ = sigmoid(logits)."""
    return _reduce(F.binary_cross_entropy_with_logits(logits, x, reduction="none"), reduction)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − log σ² − 1)."""
    return _reduce(0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0), reduction)


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0
) -> torch.Tensor:
    """Dis step: x is real (target `real_label`, < 1 for one-sided label smoothing), x̂ is fake."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Encoder/decoder step, non-saturating: −log Dis(x̂)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
