"""VAE and adversarial losses against their closed forms, computed independently with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cavga.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    kl_divergence,
    reconstruction_loss,
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
