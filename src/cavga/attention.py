"""Grad-CAM on the latent and the attention losses of CAVGA.

Grad-CAM (Selvaraju et al.): α_k = mean_ij ∂s/∂F_k,ij, A = ReLU(Σ_k α_k F_k), scaled per image
to [0, 1] by its maximum. Computed with `create_graph=True` so that a loss on A trains the
network through the attention, as CAVGA's attention expansion loss needs.
"""

from __future__ import annotations

import torch

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
    (grads,) = torch.autograd.grad(score.sum(), features, create_graph=create_graph)
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = torch.relu((alpha * features).sum(dim=1))  # (B, h, w)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + EPS)


def latent_attention(out: ModelOutput, create_graph: bool = True) -> torch.Tensor:
    """The paper's unsupervised attention: Grad-CAM of s = Σ z with respect to the encoder map F."""
    return grad_cam(out.z.sum(dim=(1, 2, 3)), out.F, create_graph)


def inference_attention(model: CAVGA, features: torch.Tensor) -> torch.Tensor:
    """`latent_attention` at inference (z = μ) without gradients into the network's weights.

    Only the latent head is re-run on a detached copy of F, so the backward pass is cheap.
    """
    with torch.enable_grad():
        F = features.detach().requires_grad_(True)
        mu, _ = model.latent(F)
        return grad_cam(mu.sum(dim=(1, 2, 3)), F, create_graph=False).detach()


def attention_expansion_loss(attention: torch.Tensor) -> torch.Tensor:
    """L_ae = mean over images of mean_ij (1 − A_ij): push the attention to cover the whole image."""
    return (1.0 - attention).mean()
