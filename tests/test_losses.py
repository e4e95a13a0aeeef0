"""Losses against their closed forms, computed independently with NumPy and scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from cavga.losses import (
    classifier_loss,
    complementary_guided_attention_loss,
    discriminator_loss,
    generator_adversarial_loss,
    kl_divergence,
    reconstruction_loss,
    ssim_map,
)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reconstruction_loss_is_binary_cross_entropy(rng, reduction):
    """L_R = −[x log x̂ + (1 − x) log(1 − x̂)]: per-image sum then batch mean, or element mean."""
    logits = rng.normal(0, 2, size=(3, 2, 4, 5))
    x = rng.uniform(0, 1, size=logits.shape)
    xh = _sigmoid(logits)
    per = -(x * np.log(xh) + (1 - x) * np.log(1 - xh))
    expected = per.reshape(3, -1).sum(1).mean() if reduction == "sum" else per.mean()
    got = reconstruction_loss(torch.from_numpy(logits), torch.from_numpy(x), reduction)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_reconstruction_loss_sum_is_elements_times_mean(rng):
    """The two reductions differ exactly by the number of elements per image."""
    logits = torch.from_numpy(rng.normal(size=(2, 3, 4, 4)))
    x = torch.from_numpy(rng.uniform(size=(2, 3, 4, 4)))
    s = reconstruction_loss(logits, x, "sum").item()
    m = reconstruction_loss(logits, x, "mean").item()
    assert s == pytest.approx(48 * m, rel=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kl_divergence_closed_form(rng, reduction):
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − log σ² − 1), reduced like L_R."""
    mu = rng.normal(size=(4, 3, 2, 2))
    logvar = rng.normal(size=(4, 3, 2, 2))
    per = 0.5 * (mu**2 + np.exp(logvar) - logvar - 1)
    expected = per.reshape(4, -1).sum(1).mean() if reduction == "sum" else per.mean()
    got = kl_divergence(torch.from_numpy(mu), torch.from_numpy(logvar), reduction)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_kl_divergence_single_value_by_hand():
    """μ = 1, log σ² = 0 per element gives ½ per element: 6 elements sum to 3 per image."""
    mu, logvar = torch.ones(2, 6, 1, 1), torch.zeros(2, 6, 1, 1)
    assert kl_divergence(mu, logvar, "sum").item() == pytest.approx(3.0)
    assert kl_divergence(mu, logvar, "mean").item() == pytest.approx(0.5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kl_divergence_is_zero_at_the_prior(reduction):
    """μ = 0 and log σ² = 0 is the prior itself: KL is exactly 0."""
    z = torch.zeros(2, 3, 4, 4)
    assert kl_divergence(z, z, reduction).item() == 0.0


@pytest.mark.parametrize("real_label", [1.0, 0.9])
def test_discriminator_loss_by_hand(real_label):
    """Dis loss = mean BCE(real, label) + mean BCE(fake, 0), from the sigmoid of the logits."""
    real = np.array([2.0, -1.0, 0.5])
    fake = np.array([-3.0, 0.0, 1.5])
    pr, pf = _sigmoid(real), _sigmoid(fake)
    expected = -(real_label * np.log(pr) + (1 - real_label) * np.log(1 - pr)).mean() - np.log(1 - pf).mean()
    got = discriminator_loss(torch.from_numpy(real), torch.from_numpy(fake), real_label)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_discriminator_loss_at_zero_logits_is_two_log_two():
    """A discriminator that outputs ½ everywhere pays log 2 on each side (label 1)."""
    z = torch.zeros(4)
    assert discriminator_loss(z, z).item() == pytest.approx(2 * np.log(2))


def test_label_smoothing_touches_only_the_real_term():
    """Label smoothing applies to real images only: with real logits fixed, fake terms are identical."""
    real, fake = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    diff = discriminator_loss(real, fake, 0.9) - discriminator_loss(real, torch.zeros(2), 0.9)
    expected = (-np.log(1 - _sigmoid(np.array([-1.0, 0.5])))).mean() - np.log(2)
    assert diff.item() == pytest.approx(expected, rel=1e-6)


def test_generator_adversarial_loss_is_non_saturating():
    """The generator pays −log sigmoid(logit) on its reconstructions, averaged over images."""
    logits = np.array([-2.0, 0.0, 3.0, 0.7])
    expected = -np.log(_sigmoid(logits)).mean()
    got = generator_adversarial_loss(torch.from_numpy(logits))
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("loss", [reconstruction_loss, kl_divergence])
def test_bad_reduction_raises(loss):
    """A reduction other than "sum" or "mean" is a ValueError that names it."""
    t = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="'median'"):
        loss(t, t, "median")


def test_ssim_map_matches_scikit_image(rng):
    """Per-pixel SSIM equals scikit-image's Gaussian SSIM (σ 1.5, population covariance) on every
    pixel away from the edges, where the two pad differently; their means agree there too."""
    a = rng.uniform(0, 1, size=(2, 3, 24, 20))
    b = np.clip(a + rng.normal(0, 0.2, size=a.shape), 0, 1)
    ours = ssim_map(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert ours.shape == a.shape
    r = 5  # the 11×11 window's radius: scikit-image's own crop for its mean
    for i in range(2):
        for c in range(3):
            mean, full = structural_similarity(
                a[i, c],
                b[i, c],
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                full=True,
            )
            np.testing.assert_allclose(ours[i, c, r:-r, r:-r], full[r:-r, r:-r], rtol=1e-9, atol=1e-12)
            assert ours[i, c, r:-r, r:-r].mean() == pytest.approx(mean, rel=1e-9)


def test_ssim_and_l2_reconstruction_losses(rng):
    """An exact reconstruction has SSIM 1 (loss 0); "l2" is the mean squared error of sigmoid(logits)."""
    x = rng.uniform(0.05, 0.95, size=(2, 1, 16, 16))
    logits = np.log(x / (1 - x))  # sigmoid(logits) = x
    assert reconstruction_loss(torch.from_numpy(logits), torch.from_numpy(x), "mean", "ssim").item() == (
        pytest.approx(0.0, abs=1e-9)
    )
    y = rng.uniform(0, 1, size=x.shape)
    got = reconstruction_loss(torch.from_numpy(logits), torch.from_numpy(y), "mean", "l2").item()
    assert got == pytest.approx(((x - y) ** 2).mean(), rel=1e-10)
    with pytest.raises(ValueError, match="'bce', 'l2' or 'ssim'"):
        reconstruction_loss(torch.from_numpy(logits), torch.from_numpy(y), "mean", "l1")


def test_classifier_loss_is_two_class_cross_entropy():
    """L_bce on C's two logits: −log softmax of the true class, averaged."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    expected = (-np.log(np.exp(2) / (np.exp(2) + 1)) - np.log(1 / (1 + np.e))) / 2
    assert classifier_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)


def test_complementary_guided_attention_loss_counts_only_correct_normal_images():
    """L_cga is zero for anomalous images and for misclassified normal ones, positive for a normal
    image that C gets right (by hand: mean(1 − A^n) + mean(A^a)), and averaged over all N images."""
    a_normal = torch.tensor([[[0.5, 1.0], [1.0, 0.5]]]).repeat(4, 1, 1)  # mean(1 − A^n) = 0.25
    a_anom = torch.tensor([[[0.0, 0.2], [0.2, 0.0]]]).repeat(4, 1, 1)  # mean(A^a) = 0.1
    # images: normal + predicted normal, normal + predicted anomalous, anomalous ×2 (either prediction)
    logits = torch.tensor([[3.0, -1.0], [-1.0, 3.0], [3.0, -1.0], [-1.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    per_image = [
        complementary_guided_attention_loss(
            a_normal[i : i + 1], a_anom[i : i + 1], logits[i : i + 1], labels[i : i + 1]
        )
        for i in range(4)
    ]
    assert per_image[0].item() == pytest.approx(0.35)
    assert [v.item() for v in per_image[1:]] == [0.0, 0.0, 0.0]
    batch = complementary_guided_attention_loss(a_normal, a_anom, logits, labels)
    assert batch.item() == pytest.approx(0.35 / 4)
    # A normal attention that covers everything and an empty anomalous one give zero.
    full, empty = torch.ones(1, 2, 2), torch.zeros(1, 2, 2)
    assert complementary_guided_attention_loss(full, empty, logits[:1], labels[:1]).item() == 0.0


def test_mask_guided_attention_loss_by_hand():
    """Anomalous image: |A^a − m| + |A^n − (1 − m)| on the attention grid, m the max-pooled pixel mask;
    normal image: the paper's L_cga term (counted only when C is right); the mean is over all N."""
    from cavga.losses import mask_guided_attention_loss

    a_n = torch.tensor([[[1.0, 0.5], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    a_a = torch.tensor([[[0.0, 0.5], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # image 0 classified normal, image 1 anomalous
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 4, 4)
    masks[1, 0, 1] = 1.0  # one pixel of the top-left 2×2 cell of image 1
    # Image 0 (normal, correct): mean(1 − A^n) + mean(A^a) = 0.125 + 0.125.
    # Image 1: m = [[1, 0], [0, 0]]; mean|A^a − m| = 0; mean|A^n − (1 − m)| = (0.5 + 0.5·3) / 4 = 0.5.
    expected = (0.25 + 0.5) / 2
    loss = mask_guided_attention_loss(a_n, a_a, logits, labels, masks)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_the_generator_step_computes_no_gradient_for_the_discriminator():
    """Dis learns from its own loss only. The generator's adversarial term flows through Dis back to
    x̂ (with only that term on, the decoder's gradient comes from it) but computes none for Dis's
    weights, which Dis's next step would throw away: each Dis weight receives one gradient per
    training step, and Dis is trainable again after it."""
    from cavga.config import make_config
    from cavga.engine.train import train_step
    from cavga.networks import create_model

    torch.manual_seed(0)
    model = create_model("cavga-ru", 32, 1)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    opt_g = torch.optim.SGD(model.generator_parameters(), lr=0.0)
    opt_d = torch.optim.SGD(model.discriminator.parameters(), lr=0.0)
    counts: dict[str, int] = {}
    for name, p in model.discriminator.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
    cfg = make_config(model="cavga-ru", image_size=32, w_rec=0.0, w_kl=0.0, w_ae=0.0, w_adv=1.0)
    train_step(model, x, torch.zeros(2, dtype=torch.long), cfg, opt_g, opt_d, adversarial=True)
    assert counts == {name: 1 for name, _ in model.discriminator.named_parameters()}
    assert all(p.requires_grad for p in model.discriminator.parameters())
    decoder = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert decoder and sum(g.abs().sum() for g in decoder) > 0
