"""Grad-CAM on the latent and the attention expansion loss, checked against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from cavga.attention import (
    EPS,
    advae_attention,
    attention_expansion_loss,
    class_attention,
    grad_cam,
    inference_attention,
    inference_class_attention,
    latent_attention,
)
from cavga.config import make_config
from cavga.engine.train import train_step
from cavga.networks import create_model


def _features(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).requires_grad_(True)


def test_grad_cam_matches_hand_computation():
    """s = 3ΣF₀ − ΣF₁ + ΣF₀² gives α₀ = 3 + 2·mean F₀ = 4, α₁ = −1, so A = ReLU(4F₀ − F₁)/7."""
    F = _features([[[[1.0, 2.0], [0.0, -1.0]], [[1.0, 1.0], [4.0, 0.0]]]])
    s = 3 * F[:, 0].sum(dim=(1, 2)) - F[:, 1].sum(dim=(1, 2)) + F[:, 0].pow(2).sum(dim=(1, 2))
    cam = grad_cam(s, F)
    expected = torch.tensor([[[3 / 7, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    assert cam.shape == (1, 2, 2)
    torch.testing.assert_close(cam, expected, atol=1e-6, rtol=0)


def test_grad_cam_all_negative_gives_zero_map():
    """When every Σ_k α_k F_k is negative the ReLU leaves nothing: the map is all zeros, not NaN."""
    F = _features([[[[1.0, 2.0], [3.0, 4.0]]]])
    cam = grad_cam(-F.sum(dim=(1, 2, 3)), F)
    assert torch.equal(cam, torch.zeros(1, 2, 2, dtype=torch.float64))


def test_grad_cam_shape_range_and_per_image_normalisation():
    """Each image is scaled by its own maximum and does not depend on the other images in the batch."""
    torch.manual_seed(0)
    base = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    F = torch.cat([base, 100 * base.roll(1, dims=3)]).requires_grad_(True)
    w = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1)

    def score(f: torch.Tensor) -> torch.Tensor:
        return (w * f).sum(dim=(1, 2, 3)) + f.pow(2).sum(dim=(1, 2, 3)) * 0.1

    cam = grad_cam(score(F), F)
    assert cam.shape == (2, 4, 5)
    assert cam.min() >= 0 and cam.max() <= 1
    torch.testing.assert_close(cam.amax(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    for b in range(2):
        Fb = F[b : b + 1].detach().clone().requires_grad_(True)
        torch.testing.assert_close(cam[b : b + 1], grad_cam(score(Fb), Fb), atol=1e-12, rtol=0)


def _cam_loss(weight: torch.Tensor, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    F = torch.nn.functional.conv2d(x, weight)
    s = (F.pow(2) * torch.arange(1.0, F.shape[1] + 1, dtype=F.dtype).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return attention_expansion_loss(grad_cam(s, F, create_graph=create_graph))


def test_create_graph_gives_the_true_gradient_of_a_loss_on_the_attention():
    """With create_graph=True a loss on A has the finite-difference gradient, including through α."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: _cam_loss(w, x), (weight,), eps=1e-6, atol=1e-5)
    (g,) = torch.autograd.grad(_cam_loss(weight, x), weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    (g_detached,) = torch.autograd.grad(_cam_loss(weight, x, create_graph=False), weight)
    assert not torch.allclose(g, g_detached)


def _first_conv(model) -> torch.Tensor:
    return next(p for p in model.encoder.parameters() if p.dim() == 4)


@pytest.mark.parametrize(("name", "size"), [("cavga-ru", 64), ("cavga-du", 32)])
def test_attention_expansion_loss_trains_the_encoder_in_proportion_to_its_weight(name, size):
    """In `train_step` with only w_ae on, the first encoder conv's gradient is non-zero, finite,
    linear in w_ae (1 vs 0.01 gives ×100) and zero at w_ae = 0."""
    torch.manual_seed(0)
    model = create_model(name, size, 1, latent_channels=8)
    with torch.no_grad():
        # F ≥ 0 after the encoder's last ReLU, so a μ head with negative column sums makes
        # ReLU(Σ α_k F_k) zero everywhere and L_ae flat; positive weights keep the case informative.
        model.latent.mu.weight.abs_()
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    opt_g = torch.optim.SGD(model.generator_parameters(), lr=0.0)
    opt_d = torch.optim.SGD(model.discriminator.parameters(), lr=0.0)
    grads = {}
    for w_ae in (0.0, 0.01, 1.0):
        cfg = make_config(model=name, image_size=size, w_rec=0.0, w_kl=0.0, w_adv=0.0, w_ae=w_ae)
        torch.manual_seed(123)
        train_step(model, x, torch.zeros(len(x), dtype=torch.long), cfg, opt_g, opt_d, adversarial=False)
        grad = _first_conv(model).grad
        grads[w_ae] = torch.zeros_like(_first_conv(model)) if grad is None else grad.clone()
    assert torch.isfinite(grads[1.0]).all() and grads[1.0].abs().sum() > 0
    scale = grads[1.0].abs().max().item()
    torch.testing.assert_close(grads[1.0], 100 * grads[0.01], rtol=1e-4, atol=1e-4 * scale)
    assert torch.count_nonzero(grads[0.0]) == 0


@pytest.mark.parametrize(("name", "size"), [("cavga-ru", 64), ("cavga-du", 32)])
def test_inference_attention_equals_latent_attention_at_the_mean(name, size):
    """At inference the attention is latent_attention with z = μ, computed from F alone."""
    torch.manual_seed(0)
    model = create_model(name, size, 1, latent_channels=8).eval()
    x = torch.rand(3, 1, size, size)
    out = model(x, sample=False)
    expected = latent_attention(out, create_graph=False)
    got = inference_attention(model, out.F)
    assert got.shape == out.F.shape[:1] + out.F.shape[2:]
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_attention_expansion_loss_is_mean_of_one_minus_attention():
    """L_ae = mean(1 − A): 0 for all-ones, 1 for all-zeros, and the exact mean otherwise."""
    assert attention_expansion_loss(torch.ones(2, 3, 3)).item() == 0.0
    assert attention_expansion_loss(torch.zeros(2, 3, 3)).item() == 1.0
    A = torch.tensor([[[0.0, 0.5], [1.0, 0.25]], [[1.0, 1.0], [1.0, 1.0]]])
    assert attention_expansion_loss(A).item() == pytest.approx((1.0 + 0.5 + 0.0 + 0.75) / 8)


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    cam = torch.relu(cam)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + EPS)


def test_class_attention_of_a_conv_z_by_hand():
    """C is linear on the flattened z, so ∂y_c/∂z is C's weight row c laid out as (Z, h, w):
    α^c_k = mean_ij W_c[k, i, j] and A^c = ReLU(Σ_k α^c_k z_k) / max, for each class."""
    torch.manual_seed(0)
    model = create_model("cavga-dw", 32, 1, latent_channels=4).eval()
    out = model(torch.rand(3, 1, 32, 32), sample=False)
    a_normal, a_anom = class_attention(out, create_graph=False)
    W = model.classifier.weight.detach().view(2, *out.z.shape[1:])  # (2, Z, h, w)
    z = out.z.detach()
    for c, got in enumerate((a_normal, a_anom)):
        alpha = W[c].mean(dim=(1, 2))  # (Z,)
        expected = _normalise(torch.einsum("k,bkhw->bhw", alpha, z))
        torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "size"), [("cavga-dw", 32), ("cavga-rw", 64), ("cavga-rw-flat", 64)])
def test_class_attention_maps_differ_and_follow_their_own_logit(name, size):
    """A^normal ≠ A^anomalous; changing only C's anomalous row changes A^anomalous and leaves
    A^normal exactly as it was (and the reverse); inference gives the same maps at z = μ."""
    torch.manual_seed(0)
    model = create_model(name, size, 1, latent_channels=8).eval()
    x = torch.rand(4, 1, size, size)
    out = model(x, sample=False)
    a_n, a_a = (a.detach() for a in class_attention(out, create_graph=False))
    assert not torch.allclose(a_n, a_a)
    for a_i, a_ref in zip(inference_class_attention(model, out), (a_n, a_a), strict=True):
        torch.testing.assert_close(a_i, a_ref, atol=1e-6, rtol=1e-5)
    for row in (1, 0):
        with torch.no_grad():
            model.classifier.weight[row] = torch.randn_like(model.classifier.weight[row])
        b_n, b_a = inference_class_attention(model, model(x, sample=False))
        changed, kept = (b_a, b_n) if row == 1 else (b_n, b_a)
        before_changed, before_kept = (a_a, a_n) if row == 1 else (a_n, a_a)
        assert not torch.allclose(changed, before_changed)
        torch.testing.assert_close(kept, before_kept, atol=1e-6, rtol=1e-5)
        a_n, a_a = b_n, b_a


def test_advae_attention_equals_one_grad_cam_per_latent_dimension():
    """The batched ADVAE map is the mean over z_i of ReLU(Grad-CAM of z_i), each computed alone, then
    scaled per image to a maximum of 1."""
    torch.manual_seed(0)
    model = create_model("vae-grad", 64, 1).eval()
    out = model(torch.rand(2, 1, 64, 64), sample=False)
    got = advae_attention(model, out.F)
    F = out.F.detach().requires_grad_(True)
    mu = model.latent(F)[0]
    cams = []
    for i in range(mu.shape[1]):
        (g,) = torch.autograd.grad(mu[:, i].sum(), F, retain_graph=True)
        cams.append(torch.relu((g.mean(dim=(2, 3), keepdim=True) * F).sum(1)))
    expected = torch.stack(cams).mean(0).detach()
    expected = expected / (expected.amax(dim=(1, 2), keepdim=True) + EPS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert got.shape == (2, 2, 2) and got.amax() <= 1.0
