"""Losses of CAVGA and its baselines (each weight is a config value, applied by the engine)."""

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


def reconstruction_loss(
    logits: torch.Tensor, x: torch.Tensor, reduction: str = "sum", kind: str = "bce"
) -> torch.Tensor:
    """L_R with x̂ = sigmoid(logits): "bce" −Σ x log x̂ + (1 − x) log(1 − x̂) (CAVGA), "l2" Σ (x − x̂)²
    (AE-L2) or "ssim" Σ (1 − SSIM(x, x̂)) per pixel (AE-SSIM)."""
    if kind == "bce":
        per = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "l2":
        per = (torch.sigmoid(logits) - x).pow(2)
    elif kind == "ssim":
        per = 1.0 - ssim_map(torch.sigmoid(logits), x)
    else:
        raise ValueError(f"reconstruction loss must be 'bce', 'l2' or 'ssim', not {kind!r}")
    return _reduce(per, reduction)


def _gaussian_window(sigma: float, radius: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(
    a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, radius: int = 5, data_range: float = 1.0
) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) of two (B, C, H, W) batches, per channel, same size as the input.

    Gaussian-weighted local statistics (σ 1.5, an 11×11 window) with population covariances, as
    scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`; edges
    are mirrored. Differentiable, so AE-SSIM trains on it (scikit-image's version is NumPy only).
    """
    g = _gaussian_window(sigma, radius, a.device, a.dtype)
    channels = a.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian filter, per channel
        t = F.pad(t, (radius, radius, radius, radius), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return num / den


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


def classifier_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_bce of the weakly supervised classifier C: cross-entropy of its 2 logits (0 normal, 1 anomalous)."""
    return F.cross_entropy(class_logits, labels)


def complementary_guided_attention_loss(
    attention_normal: torch.Tensor,
    attention_anomalous: torch.Tensor,
    class_logits: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """L_cga = mean over the N images of 1(p = y = normal) · mean_ij[(1 − A^normal_ij) + A^anomalous_ij].

    Only normal images that C classifies correctly count: a wrong prediction's attention points at the
    wrong places (paper §3.2). The others contribute zero but still count in N.
    """
    correct_normal = (class_logits.argmax(1) == 0) & (labels == 0)  # (B,), no gradient through argmax
    per_image = (1.0 - attention_normal).flatten(1).mean(1) + attention_anomalous.flatten(1).mean(1)
    return (correct_normal.to(per_image.dtype) * per_image).mean()


def mask_guided_attention_loss(
    attention_normal: torch.Tensor,
    attention_anomalous: torch.Tensor,
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
) -> torch.Tensor:
    """L_cga extended to images whose anomaly mask is known (synthetic anomalies, self-supervised).

    Normal images: the paper's L_cga term. Anomalous images: A^anomalous should be the mask and
    A^normal its complement, mean_ij[|A^anomalous_ij − m_ij| + |A^normal_ij − (1 − m_ij)|], with m the
    mask at the attention's grid (a cell counts as anomalous where any of its pixels is). Mean over N.

    Args:
        attention_normal, attention_anomalous: (B, h, w) class attentions in [0, 1].
        class_logits: (B, 2); labels: (B,) 0 normal, 1 anomalous.
        masks: (B, H, W) 0/1 pixel masks (all zero for normal images).
    """
    m = F.adaptive_max_pool2d(masks.unsqueeze(1).float(), attention_anomalous.shape[-2:]).squeeze(1)
    guided = ((attention_anomalous - m).abs() + (attention_normal - (1.0 - m)).abs()).flatten(1).mean(1)
    anomalous = (labels == 1).to(guided.dtype)
    normal_term = complementary_guided_attention_loss(
        attention_normal, attention_anomalous, class_logits, labels
    )
    return normal_term + (anomalous * guided).mean()
