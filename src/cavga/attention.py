"""Grad-CAM on the latent and the attention losses of CAVGA.

Grad-CAM (Selvaraju et al.): α_k = mean_ij ∂s/∂F_k,ij, A = ReLU(Σ_k α_k F_k), scaled per image
to [0, 1] by its maximum. Computed with `create_graph=True` so that a loss on A trains the
network through the attention, as CAVGA's attention expansion loss needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cavga.losses import kl_divergence, reconstruction_loss
from cavga.networks import CAVGA, ModelOutput

EPS = 1e-8


def grad_cam(score: torch.Tensor, features: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Grad-CAM of a per-image score with respect to a feature map.

    Args:
        score: (B,) one scalar per image, computed from `features`.
        features: (B, K, h, w) feature map in the graph of `score`.
        create_graph: keep the graph so the attention itself can be trained.

    Returns:
        (B, h, w) attention in [0, 1]; an all-zero map stays zero.
    """
    # retain_graph: the weakly supervised models take two Grad-CAMs (one per class) from one graph.
    (grads,) = torch.autograd.grad(score.sum(), features, create_graph=create_graph, retain_graph=True)
    return _cam(grads, features)


def _cam(grads: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = torch.relu((alpha * features).sum(dim=1))  # (B, h, w)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + EPS)


def latent_attention(out: ModelOutput, create_graph: bool = True) -> torch.Tensor:
    """The paper's unsupervised attention: Grad-CAM of s = Σ z with respect to the encoder map F."""
    return grad_cam(out.z.flatten(1).sum(1), out.F, create_graph)


def inference_attention(model: CAVGA, features: torch.Tensor) -> torch.Tensor:
    """`latent_attention` at inference (z = μ) without gradients into the network's weights.

    Only the latent head is re-run on a detached copy of F, so the backward pass is cheap.
    """
    with torch.enable_grad():
        F = features.detach().requires_grad_(True)
        mu, _ = model.latent(F)
        return grad_cam(mu.flatten(1).sum(1), F, create_graph=False).detach()


def class_attention(out: ModelOutput, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CAVGA-w's class-specific attention: Grad-CAM of C's normal and anomalous logits.

    The feature map is z itself for a convolutional z (paper §3.2); a flattened z has no grid, so
    the ablation R*w takes it on the encoder map F. Returns (A^normal, A^anomalous), each (B, h, w).
    """
    assert out.class_logits is not None, "class attention needs a weakly supervised model"
    features = out.z if out.z.dim() == 4 else out.F
    return (
        grad_cam(out.class_logits[:, 0], features, create_graph),
        grad_cam(out.class_logits[:, 1], features, create_graph),
    )


def inference_class_attention(model: CAVGA, out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """`class_attention` at inference (z = μ), re-running only the heads on a detached copy."""
    with torch.enable_grad():
        if out.mu.dim() == 4:
            z = out.mu.detach().requires_grad_(True)
            F = out.F
        else:
            F = out.F.detach().requires_grad_(True)
            z = model.latent(F)[0]
        view = ModelOutput(out.features, F, z, None, z, out.logits, out.recon, model.classify(z))
        a_n, a_a = class_attention(view, create_graph=False)
    return a_n.detach(), a_a.detach()


def advae_attention(model: CAVGA, features: torch.Tensor) -> torch.Tensor:
    """ADVAE-style attention (Liu et al., CVPR 2020): Grad-CAM of each latent dimension z_i (at μ)
    on the encoder map F, ReLU'd, averaged over the dimensions and scaled per image to [0, 1].

    One batched backward pass through the latent head gives every dimension's gradient at once.
    """
    with torch.enable_grad():
        F = features.detach().requires_grad_(True)
        mu = model.latent(F)[0].flatten(1)  # (B, D)
        D = mu.shape[1]
        eye = torch.eye(D, device=mu.device, dtype=mu.dtype).unsqueeze(1).expand(D, len(mu), D)
        (grads,) = torch.autograd.grad(mu, F, grad_outputs=eye, is_grads_batched=True)  # (D, B, K, h, w)
    alpha = grads.mean(dim=(3, 4), keepdim=True)
    cam = torch.relu((alpha * F.detach()).sum(2)).mean(0)  # (B, h, w)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + EPS)


def attention_expansion_loss(attention: torch.Tensor) -> torch.Tensor:
    """L_ae = mean over images of mean_ij (1 − A_ij): push the attention to cover the whole image."""
    return (1.0 - attention).mean()


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) maps to (B, size, size), bilinearly."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(
        1
    )


def nearest_stride(features: dict[int, torch.Tensor], stride: int) -> int:
    """The encoder stage closest to `stride` (small CAVGA-D inputs have fewer stages)."""
    return min(features, key=lambda s: (abs(s - stride), s))


def multiscale_attention(
    model: CAVGA, x: torch.Tensor, score: str, strides: tuple[int, ...]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Grad-CAM at several encoder stages for a chosen per-image score, at inference.

    Scores: "sum-z" (the paper's Σz, at z = μ), "kl" (the KL term of the image, non-linear in μ
    and log σ²) and "recon" (the summed BCE of x̂ = G(μ) against x). Below the last stage the
    gradient passes through non-linear layers, so even Σz gives image-dependent channel weights
    there. Returns the mean of the per-stage maps (B, H, W) at the input size and the channel
    weights α per stage (B, K) (equal rows for two images mean a fixed, image-independent readout).
    """
    size = x.shape[-1]
    with torch.enable_grad():
        feats = model.encoder(x)
        chosen = [feats[s] for s in dict.fromkeys(nearest_stride(feats, t) for t in strides)]
        mu, logvar = model.latent(feats[max(feats)])
        # Grad-CAM only needs Σ over the batch of the per-image scores: the "sum" losses are that
        # sum divided by B, and each image's score depends on its own features only.
        if score == "sum-z":
            total = mu.sum()
        elif score == "kl":
            if logvar is None:
                raise ValueError("the KL score needs a variational latent")
            total = kl_divergence(mu, logvar, "sum") * len(x)
        elif score == "recon":
            total = reconstruction_loss(model.decoder(model.latent.to_grid(mu)), x, "sum") * len(x)
        else:
            raise ValueError(f"unknown attention score {score!r}")
        grads = torch.autograd.grad(total, chosen)
    maps, weights = [], {}
    for f, g in zip(chosen, grads, strict=True):
        maps.append(upsample(_cam(g, f), size))
        weights[size // f.shape[-1]] = g.mean(dim=(2, 3))
    return torch.stack(maps).mean(0).detach(), {k: v.detach() for k, v in weights.items()}
