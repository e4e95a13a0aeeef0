"""Anomaly maps and their calibration on normal images, with a small random CAVGA-Ru at 64 px."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cavga.config import make_config
from cavga.maps import CALIBRATED, MAPS, MapMaker, calibrate, feature_deviation, fit_feature_stats
from cavga.maps.common import forward, gaussian_blur
from cavga.networks import create_model

SIZE = 64
CPU = torch.device("cpu")


def normal_images(n: int, seed: int) -> torch.Tensor:
    """Diagonal stripes with a little smooth noise: images that resemble each other."""
    g = torch.Generator().manual_seed(seed)
    ii, jj = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    stripes = 0.5 + 0.3 * torch.sin((ii + jj).float() * 0.4)
    noise = F.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=SIZE, mode="bilinear")
    return (stripes + 0.2 * (noise - 0.5)).clamp(0, 1)


def anomalous_images(n: int, seed: int) -> torch.Tensor:
    """Pixel noise, unlike anything in the normal set."""
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("cavga-ru", SIZE, 1, latent_channels=16).eval()
    # F ≥ 0 after ResNet's last ReLU and α is the μ head's column sum, so a positive head keeps the
    # untrained paper attention from being ReLU-clipped to an all-zero map for every image.
    model.latent.mu.weight.data.abs_()
    cfg = make_config(model="cavga-ru", image_size=SIZE, batch_size=4)
    train, calib = normal_images(12, seed=1), normal_images(8, seed=2)
    cal = calibrate(model, cfg, train, calib, CPU)
    return model, cfg, train, calib, cal


def _stats_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k][f], b[k][f], rtol=1e-4, atol=1e-6) for k in a for f in ("mean", "precision")
    )


def test_every_map_has_image_shape_and_range(setup):
    """Every map in MAPS is (B, H, W) in [0, 1], with one score per image."""
    model, cfg, _, _, cal = setup
    x = torch.cat([normal_images(2, seed=3), anomalous_images(1, seed=4)])
    res = MapMaker(model, cfg, cal, CPU)(x)
    for name in MAPS:
        assert res[name].shape == (3, SIZE, SIZE), name
        assert res[name].min() >= 0 and res[name].max() <= 1, name
        assert res[f"score/{name}"].shape == (3,), name
    torch.testing.assert_close(res["paper"], 1 - res["attention"])
    assert res["recon"].shape == x.shape


def test_every_map_depends_on_the_image_and_not_on_the_batch(setup):
    """Two different images give different maps for every variant; an image alone gets the same maps."""
    model, cfg, _, _, cal = setup
    x = torch.cat([normal_images(1, seed=5), anomalous_images(1, seed=6)])
    maker = MapMaker(model, cfg, cal, CPU)
    res = maker(x)
    alone = maker(x[:1])
    for name in MAPS:
        assert not torch.allclose(res[name][0], res[name][1], atol=1e-4), name
        torch.testing.assert_close(alone[name][0], res[name][0], atol=1e-5, rtol=1e-4)


def test_mean_maps_are_one_image_independent_map_over_the_held_out_normal_images(setup):
    """The stored reference is one (H, W) map per variant: the mean of that map over the held-out
    normal images (not the training images, which a memory map has memorised)."""
    model, cfg, train, calib, cal = setup
    res = MapMaker(model, cfg, cal, CPU)(calib)
    for name in MAPS:
        assert cal["mean_maps"][name].shape == (SIZE, SIZE), name
        torch.testing.assert_close(cal["mean_maps"][name], res[name].mean(0), atol=1e-5, rtol=1e-4)
    two = MapMaker(model, cfg, cal, CPU)(torch.cat([train[:1], anomalous_images(1, seed=7)]))
    assert not torch.allclose(two["latent-stats"][0], two["latent-stats"][1], atol=1e-3)


def test_feature_stats_match_a_direct_computation(setup):
    """Means (shrunk towards the global mean) and ridge-regularised pooled covariances are exactly
    those of the 3×3-averaged features of the images passed, whatever the batch size."""
    model, cfg, train, _, _ = setup
    assert cfg.stats_pool == 3
    stats = fit_feature_stats(model, train, cfg, CPU)
    with torch.no_grad():
        out = forward(model, cfg, train)  # the features the maps read (of the standardised images)
    s = cfg.position_shrink
    for name in cfg.stats_layers:
        f = out.features[int(name[1:])].double()
        f = torch.nn.functional.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
        K = f.shape[1]
        flat = f.permute(0, 2, 3, 1).reshape(-1, K)
        mean = flat.mean(0)
        cov = (flat - mean).T @ (flat - mean) / len(flat)
        cov += (0.01 * torch.trace(cov) / K + 1e-6) * torch.eye(K, dtype=cov.dtype)
        pos_mean = (1 - s) * f.mean(0) + s * mean.view(K, 1, 1)
        torch.testing.assert_close(stats[name]["mean"], pos_mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            stats[name]["precision"], torch.linalg.inv(cov).float(), rtol=1e-3, atol=1e-3
        )
    other_batching = fit_feature_stats(model, train, dataclasses.replace(cfg, batch_size=5), CPU)
    assert _stats_equal(stats, other_batching)


def test_calibration_statistics_come_from_exactly_the_training_images(setup):
    """The stored statistics are those of the training images: neither the held-out calibration
    images nor an extra anomalous image are in them, and adding either would change them."""
    model, cfg, train, calib, cal = setup
    assert _stats_equal(cal["fitted"]["latent-stats"], fit_feature_stats(model, train, cfg, CPU))
    with_calib = fit_feature_stats(model, torch.cat([train, calib]), cfg, CPU)
    with_anomaly = fit_feature_stats(model, torch.cat([train, anomalous_images(1, seed=8)]), cfg, CPU)
    assert not _stats_equal(cal["fitted"]["latent-stats"], with_calib)
    assert not _stats_equal(cal["fitted"]["latent-stats"], with_anomaly)


def test_latent_stats_deviation_is_low_for_normal_and_high_for_anomalous_images(setup):
    """A training image deviates less from the normal statistics than noise or an inverted image."""
    model, cfg, train, _, cal = setup
    raw = MapMaker(model, cfg, cal, CPU).raw
    seen = raw(train[:2])["latent-stats"].mean(dim=(1, 2))
    noise = raw(anomalous_images(2, seed=9))["latent-stats"].mean(dim=(1, 2))
    inverted = raw(1 - train[:2])["latent-stats"].mean(dim=(1, 2))
    assert seen.max() < noise.min()
    assert seen.max() < inverted.min()


def test_deviation_is_zero_for_the_only_image_the_statistics_were_fitted_on(setup):
    """With per-position means (position_shrink = 0) fitted on one image, that image's Mahalanobis
    distance is 0 at every position, and another image's is not."""
    model, cfg, train, _, _ = setup
    cfg0 = dataclasses.replace(cfg, position_shrink=0.0)
    stats = fit_feature_stats(model, train[:1], cfg0, CPU)
    with torch.no_grad():
        same = feature_deviation(forward(model, cfg0, train[:1]), stats, SIZE, cfg0.stats_pool)
        other = feature_deviation(forward(model, cfg0, train[1:2]), stats, SIZE, cfg0.stats_pool)
    assert same.shape == (1, SIZE, SIZE)
    assert same.abs().max() < 1e-2
    assert other.min() > 10 * same.abs().max()


def test_residual_map_without_blur_is_the_absolute_error(setup):
    """With blur 0 the residual map is |x − x̂| averaged over channels, and its score is its mean."""
    model, cfg, _, _, cal = setup
    x = normal_images(2, seed=10)
    res = MapMaker(model, dataclasses.replace(cfg, blur=0.0), cal, CPU).raw(x)
    with torch.no_grad():
        recon = model(x, sample=False).recon
    expected = (x - recon).abs().mean(1)
    torch.testing.assert_close(res["residual"], expected)
    torch.testing.assert_close(res["residual_score"], expected.flatten(1).mean(1))


def test_calibrated_maps_put_about_one_percent_of_normal_pixels_at_or_above_one_half(setup):
    """Calibration divides by the normal 99th percentile, so r = 1 maps to 0.5 and about 1 % of the
    calibration images' pixels reach 0.5."""
    model, cfg, _, calib, cal = setup
    res = MapMaker(model, cfg, cal, CPU)(calib)
    for name in CALIBRATED:
        frac = (res[name] >= 0.5).float().mean().item()
        assert 0.002 <= frac <= 0.05, (name, frac)


def test_image_thresholds_are_within_the_calibration_scores(setup):
    """Each image threshold is a high quantile of the held-out normal images' scores."""
    model, cfg, _, calib, cal = setup
    res = MapMaker(model, cfg, cal, CPU)(calib)
    for name in MAPS:
        scores = res[f"score/{name}"]
        assert scores.min() <= cal["image_thresholds"][name] <= scores.max() + 1e-6, name
        assert (scores > cal["image_thresholds"][name] + 1e-6).float().mean() <= 0.125, name


def test_constant_gradient_readout_is_detected_and_finer_stages_depend_on_the_image(setup):
    """At the last stage the paper's Σz has the same channel weights α for every image (a fixed
    linear readout, so its map is image-independent up to F); below it, and for the KL and
    reconstruction scores, α changes from image to image."""
    from cavga.attention import multiscale_attention

    model, _, train, _, _ = setup
    x = train[:2]
    _, paper = multiscale_attention(model, x, "sum-z", (32,))
    torch.testing.assert_close(paper[32][0], paper[32][1])
    for score, strides in (("sum-z", (8,)), ("kl", (32,)), ("recon", (32,))):
        _, alphas = multiscale_attention(model, x, score, strides)
        a = next(iter(alphas.values()))
        assert not torch.allclose(a[0], a[1]), score


@pytest.mark.parametrize("feature_input", ["standardised", "raw"])
def test_features_only_forward_gives_the_full_passs_encoder_stages(feature_input):
    """Fitting the normal states skips the decoder and the stages no map reads (`features_only`): the
    stages the maps read are the full pass's, and a map reading z still gets the full pass, μ included."""
    cfg = make_config(model="cavga-ru", image_size=32, channels=1, feature_input=feature_input)
    torch.manual_seed(0)
    model = create_model("cavga-ru", 32, 1).eval()
    x = normal_images(3, seed=5)
    with torch.no_grad():
        full, short = forward(model, cfg, x), forward(model, cfg, x, features_only=True)
        assert short.recon is None and short.mu is None
        assert set(short.features) == {4, 8} == {int(n[1:]) for n in (*cfg.stats_layers, *cfg.memory_layers)}
        for k in short.features:
            torch.testing.assert_close(short.features[k], full.features[k])
        with_z = forward(model, dataclasses.replace(cfg, stats_layers=("z",)), x, features_only=True)
        torch.testing.assert_close(with_z.mu, full.mu)


@pytest.mark.parametrize(("shape", "size", "sigma"), [((3, 1, 40, 40), 9, 2.0), ((1, 1, 33, 20), 5, 0.7)])
def test_gaussian_blur_is_torchvisions(shape, size, sigma):
    """The maps' smoothing computes what torchvision's gaussian_blur does (reflected borders)."""
    from torchvision.transforms.functional import gaussian_blur as torchvision_blur

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected = torchvision_blur(x, [size, size], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(x, size, sigma), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("values", [100_000, 1_000, 7])
def test_a_streamed_tail_gives_the_quantile_of_the_whole(monkeypatch, values):
    """Calibration streams the held-out maps: fed in uneven parts, `Tail` keeps about 1 % of the
    values and returns exactly `quantile` of the whole, also when `quantile` subsamples (a strided
    subsample is forced here with a small `QUANTILE_VALUES`)."""
    from cavga.maps import common

    monkeypatch.setattr(common, "QUANTILE_VALUES", values)
    g = torch.Generator().manual_seed(0)
    whole = torch.rand(37, 50, 30, generator=g) ** 3
    whole[5, :3] = whole.max()  # ties at the top
    tail = common.Tail(whole.numel(), 0.99)
    for part in whole.split([1, 16, 16, 4]):
        tail.update(part)
    assert tail.value() == common.quantile(whole, 0.99)
    assert len(tail.top) <= 0.011 * whole.numel() + 2


def test_calibration_scales_are_the_held_out_99th_percentiles(setup):
    """Each calibrated map's scale is the 99th percentile of its raw values on the held-out images,
    as computed from all the held-out maps at once (calibration streams them)."""
    from cavga.maps.common import quantile

    model, cfg, _, calib, cal = setup
    maker = MapMaker(model, cfg, cal, CPU)
    raw = maker.raw(calib)
    assert set(cal["scales"]) == {n for n in CALIBRATED if n != "paper"}
    for name, scale in cal["scales"].items():
        assert scale == pytest.approx(quantile(raw[name], 0.99) + 1e-12, rel=1e-6), name
