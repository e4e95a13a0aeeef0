"""The memory maps: greedy coreset, chunked nearest neighbours, the memory and nearest-image maps and
the fused image score, on small constructed cases."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from cavga.cli import main
from cavga.config import make_config
from cavga.data import load_image, make_demo_data
from cavga.maps import MapMaker, calibrate, greedy_coreset, nearest_distance
from cavga.maps import memory as memory_module
from cavga.networks import create_model

CPU = torch.device("cpu")


def clusters(n_clusters: int = 6, per: int = 50, dim: int = 8, spread: float = 0.05, seed: int = 0):
    """Tight clusters around far-apart centres: the optimal k-centre radius is at most `spread`·√dim."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(n_clusters, dim, generator=g)
    points = centres.repeat_interleave(per, 0) + spread * torch.randn(n_clusters * per, dim, generator=g)
    return points, centres


def test_coreset_is_seeded_and_covers_every_feature_within_its_radius():
    """With k = number of clusters the greedy choice keeps one point per cluster; every feature lies
    within the returned radius of a kept one, and that radius is within twice the best possible
    (each cluster's diameter). The same seed gives the same choice; another seed another first centre."""
    points, _ = clusters()
    keep, radius = greedy_coreset(points, 6, seed=3)
    assert len(set((keep // 50).tolist())) == 6  # one per cluster
    nearest = torch.cdist(points, points[keep]).min(1).values
    assert nearest.max() <= radius + 1e-5
    assert radius <= 2 * torch.cdist(points[:50], points[:50]).max()
    again, _ = greedy_coreset(points, 6, seed=3)
    assert torch.equal(keep, again)
    other, _ = greedy_coreset(points, 6, seed=4)
    assert not torch.equal(keep, other)
    everything, r0 = greedy_coreset(points, 10_000)
    assert torch.equal(everything, torch.arange(len(points))) and r0 == 0.0


def test_coreset_radius_shrinks_as_more_points_are_kept():
    points, _ = clusters(n_clusters=3, per=100, spread=1.0)
    radii = [greedy_coreset(points, k, seed=0)[1] for k in (3, 30, 100)]
    assert radii[0] > radii[1] > radii[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_nearest_distance_equals_the_brute_force_one(monkeypatch, dtype):
    """Splitting the bank into blocks of rows and the queries into chunks (forced tiny here) changes
    nothing, a tie goes to the earlier row as with `argmin`, and a half-precision bank gives the
    distances to its rows widened."""
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(37, 5, generator=g), torch.randn(23, 5, generator=g).to(dtype)
    bank[17] = bank[2]  # the same row in another block, nearest to the first query
    q[0] = bank[2].float() + 0.01
    d = torch.cdist(q, bank.float())
    monkeypatch.setattr(memory_module, "CHUNK_ELEMENTS", 8)  # two queries per chunk of 4 rows
    monkeypatch.setattr(memory_module, "SQUARES_ELEMENTS", 20)  # four bank rows per block
    monkeypatch.setattr(memory_module, "BLOCK_ALIGN", 4)  # the last block of 3 padded to 4
    dist, index = nearest_distance(q, bank)
    torch.testing.assert_close(dist, d.min(1).values)
    assert torch.equal(index, d.argmin(1)) and index[0] == 2 and 17 not in index


def test_bank_blocks_are_aligned_and_even():
    """Bank blocks have a multiple of `BLOCK_ALIGN` rows (an odd output row length halved the
    product's speed), split the bank evenly, and hold at most `SQUARES_ELEMENTS` values."""
    assert memory_module._block_rows(4000, 396) == 2000  # 2,647 rows fit, so two blocks of 2,000
    assert memory_module._block_rows(762, 1500) == 384  # 699 fit: two blocks of 381, rounded up
    assert memory_module._block_rows(5, 396) == memory_module._block_rows(0, 396) == 16
    for n, width in [(4000, 396), (762, 1500), (5, 396), (100_000, 7)]:
        rows = memory_module._block_rows(n, width)
        assert rows % memory_module.BLOCK_ALIGN == 0
        assert rows * width <= memory_module.SQUARES_ELEMENTS or rows == memory_module.BLOCK_ALIGN


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = 0.5 + 0.25 * torch.sin((ii + jj).float() * 0.5)
    return (base + 0.05 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def anchor():
    cfg = make_config(
        model="knn-patches", image_size=32, batch_size=4, blur=0.0, coreset_size=100_000, image_score="peak"
    )
    model = create_model("knn-patches", 32, 1)
    train, calib = _images(6, 1), _images(4, 2)
    return model, cfg, train, calib, calibrate(model, cfg, train, calib, CPU)


def test_memory_map_is_the_raw_patch_distance_to_the_nearest_training_patch(anchor):
    """With every candidate kept, a training image's own patches are in memory (distance 0), and a
    new image's raw map is each patch's distance to its nearest training patch, computed directly."""
    model, cfg, train, _, cal = anchor
    maker = MapMaker(model, cfg, cal, CPU, maps=("memory",))
    # cdist's matrix-product form leaves a few 1e-3 of rounding in a zero distance of 64-d patches.
    assert maker.raw(train[:1])["memory"].abs().max() < 5e-3
    x = _images(1, 9)
    x[..., 10:16, 10:16] = 1.0  # a bright square
    raw = maker.raw(x)["memory"]
    patches = model(x).F[0].flatten(1).T  # (positions, p²)
    bank = torch.cat([model(t[None]).F[0].flatten(1).T for t in train])
    direct = torch.cdist(patches, bank).min(1).values.view(16, 16)
    # Bilinear upsampling of the 16×16 grid to 32×32 keeps its mean.
    torch.testing.assert_close(raw[0].mean(), direct.mean(), rtol=1e-4, atol=1e-4)
    assert raw[0, 10:16, 10:16].mean() > 5 * raw[0, 24:, 24:].mean()


def test_memory_position_makes_the_nearest_normal_patch_one_from_the_same_place():
    """Normal images have a bright bar on their left side only. A test image with the bar on its right
    matches the left bars' patches when position does not count (`memory_position` 0), and stands out
    where it is when it does; the left bar itself stays normal either way."""
    g = torch.Generator().manual_seed(0)

    def images(n: int, left: bool) -> torch.Tensor:
        x = 0.3 + 0.02 * torch.rand(n, 1, 32, 32, generator=g)
        x[..., 4:28, (4 if left else 24) : (8 if left else 28)] = 0.9
        return x

    train, calib, test = images(8, True), images(4, True), torch.cat([images(1, False), images(1, True)])
    peaks = {}
    for weight in (0.0, 5.0):
        cfg = make_config(
            model="knn-patches",
            image_size=32,
            batch_size=4,
            blur=0.0,
            coreset_size=100_000,
            memory_position=weight,
        )
        model = create_model("knn-patches", 32, 1)
        cal = calibrate(model, cfg, train, calib, CPU)
        assert ("position" in cal["fitted"]["memory"]) == bool(weight)
        raw = MapMaker(model, cfg, cal, CPU, maps=("memory",)).raw(test)["memory"]
        peaks[weight] = raw[0, 4:28, 24:28].mean() / raw[1, 4:28, 4:8].mean().clamp_min(1e-6)
    assert peaks[0.0] < 3 and peaks[5.0] > 10 * peaks[0.0]


def test_nearest_image_map_and_score(anchor):
    """The nearest-image score is the RMS distance of the standardised image to the nearest standardised
    training image (kept in half precision), and the map is their absolute difference; a training
    image scores 0 up to that rounding."""
    model, cfg, train, _, cal = anchor
    maker = MapMaker(model, cfg, cal, CPU, maps=("nearest-image",))
    assert cal["fitted"]["nearest-image"]["images"].dtype == memory_module.BANK_DTYPE == torch.float16
    assert maker.raw(train[2:3])["rawscore/nearest-image"].item() < 5e-4  # fp16: 2.4e-4 of each value
    x = 1 - train[:1]
    res = maker.raw(x)
    std = lambda t: (t - t.mean()) / (t.std() + 1e-6)  # noqa: E731
    kept = lambda t: std(t).to(memory_module.BANK_DTYPE).float()  # noqa: E731
    dists = torch.stack([(std(x[0]) - kept(t)).pow(2).mean().sqrt() for t in train])
    torch.testing.assert_close(res["rawscore/nearest-image"][0], dists.min(), rtol=1e-4, atol=1e-5)
    nearest = train[int(dists.argmin())]
    torch.testing.assert_close(
        res["nearest-image"][0], (std(x[0]) - kept(nearest)).abs()[0], atol=1e-4, rtol=1e-4
    )


def test_fused_score_is_the_mean_of_standardised_peak_and_whole_image_scores(anchor):
    """fused = ½ [(peak − μ_peak)/σ_peak + (whole − μ_whole)/σ_whole], with μ and σ from the held-out
    normal images only; the peak score is kept for image_score = "peak"."""
    model, cfg, _, calib, cal = anchor
    x = torch.cat([_images(2, 5), torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))])
    peak = MapMaker(model, cfg, cal, CPU, maps=("memory",))(x)
    fused_cfg = dataclasses.replace(cfg, image_score="fused")
    fused = MapMaker(model, fused_cfg, cal, CPU, maps=("memory",))(x)
    torch.testing.assert_close(peak["score/memory"], peak["memory"].flatten(1).amax(1))
    held = MapMaker(model, cfg, cal, CPU, maps=("memory",))(calib)
    norm = lambda s, ref: (s - ref.mean()) / (ref.std() + 1e-3 * ref.mean().abs() + 1e-12)  # noqa: E731
    expected = 0.5 * (
        norm(peak["score/memory"], held["score/memory"]) + norm(peak["global_score"], held["global_score"])
    )
    torch.testing.assert_close(fused["score/memory"], expected, rtol=1e-4, atol=1e-4)
    assert fused["score/memory"][2] > fused["score/memory"][:2].max()  # noise is far from everything


def test_standardised_feature_input_makes_the_maps_blind_to_brightness_and_contrast(tmp_path) -> None:
    """With `feature_input = "standardised"` a part that is brighter or lower in contrast as a whole
    (a·x + b) gets the same memory and latent-stats maps and the same whole-image score; with the
    raw input it does not."""
    from cavga.engine.run import load_checkpoint, load_model

    data = make_demo_data(tmp_path / "d", seed=0, image_size=32, n_train=12, n_test_good=1, n_test_defect=1,
                          categories=("brick",))  # fmt: skip
    x = torch.stack([load_image(p, 32, 1) for p in sorted((data / "brick" / "test").rglob("*.png"))[:4]])
    changed = 0.5 * x + 0.2
    for feature_input, same in (("standardised", True), ("raw", False)):
        run = tmp_path / feature_input
        args = ["--image-size", "32", "--steps", "1", "--batch-size", "4", "--feature-input", feature_input]
        assert (
            main(["train", "--data", str(data), *args, "--out", str(run), "--quiet", "--device", "cpu"]) == 0
        )
        ckpt = load_checkpoint(run)
        model, cfg = load_model(ckpt, torch.device("cpu"))
        assert cfg.feature_input == feature_input
        maker = MapMaker(
            model, cfg, ckpt["calibration"], torch.device("cpu"), maps=("memory", "latent-stats")
        )
        a, b = maker.raw(x), maker.raw(changed)
        for key in ("memory", "latent-stats", "global_score"):
            assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-4) == same, (feature_input, key)


def test_a_run_saved_before_the_standardised_default_keeps_raw_features() -> None:
    """The default became "standardised"; a run saved without the setting was made with raw
    features, and its calibration only fits those. Likewise a run saved before the gradient
    histograms keeps a whole-image embedding without them."""
    from cavga.config import TrainConfig, make_config

    saved = TrainConfig().to_dict()
    del saved["feature_input"], saved["gradient_histograms"], saved["memory_texture"]
    assert TrainConfig.from_saved(saved).feature_input == "raw"
    assert TrainConfig.from_saved({**saved, "feature_input": "standardised"}).feature_input == "standardised"
    assert make_config().feature_input == "standardised"
    assert not TrainConfig.from_saved(saved).gradient_histograms
    assert TrainConfig.from_saved(saved).memory_texture == 0
    assert make_config().gradient_histograms


@pytest.mark.parametrize(("channels", "side", "cells"), [(1, 32, 4), (3, 24, 4), (1, 30, 4), (1, 64, 8)])
def test_gradient_histograms_are_scikit_images_hog(channels, side, cells):
    """Ours equals `skimage.feature.hog` (its defaults, 2 × 2 cells per block, L2-Hys) on random
    images: grey and colour (the strongest channel per pixel), and a side the cells do not divide
    (the last pixels are left out, as scikit-image does)."""
    from skimage.feature import hog

    x = torch.rand(
        2, channels, side, side, generator=torch.Generator().manual_seed(side), dtype=torch.float64
    )
    ours = memory_module.gradient_histograms(x, cells)
    for image, got in zip(x, ours, strict=True):
        image = image.permute(1, 2, 0).numpy()
        expected = hog(
            image if channels > 1 else image[..., 0],
            pixels_per_cell=(side // cells, side // cells),
            cells_per_block=(2, 2),
            channel_axis=-1 if channels > 1 else None,
        )
        torch.testing.assert_close(got, torch.from_numpy(expected), rtol=0, atol=1e-6)


def test_gradient_histograms_see_orientation_not_brightness():
    """A vertical edge and a horizontal one differ; the same edge brighter and stronger does not."""
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1.0
    across = edge.transpose(-1, -2)
    h = memory_module.gradient_histograms
    torch.testing.assert_close(h(edge, 4), h(3 * edge + 1, 4), rtol=0, atol=1e-5)
    assert (h(edge, 4) - h(across, 4)).abs().max() > 0.5


def test_local_texture_on_stripes_and_a_step():
    """Per cell: the share of gradient energy in each orientation (vertical stripes: all at 0°,
    horizontal ones: all at 90°, the fifth of nine bins), and the mean and spread of the standardised
    pixels (a dark and a bright half: each half's standardised value, spread 0)."""
    columns = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4)  # period 4: central differences ±1 or 0
    stripes = columns.expand(16, 16)[None, None].clone()
    n = memory_module.ORIENTATIONS
    for image, bin_ in ((stripes, 0), (stripes.transpose(-1, -2), 4)):
        shares = memory_module.local_texture(image, grid=2, pool=1)[:, :n]
        expected = torch.zeros(1, n, 2, 2)
        expected[:, bin_] = 1.0
        torch.testing.assert_close(shares, expected, rtol=0, atol=1e-3)  # eps in the share's denominator
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1.0
    texture = memory_module.local_texture(step, grid=2, pool=1)
    level = memory_module.standardize(step)[0, 0, 0]  # the two halves' standardised values
    torch.testing.assert_close(texture[0, n + 1], torch.stack([level[[0, 8]]] * 2))
    torch.testing.assert_close(texture[0, n + 2], torch.zeros(2, 2), rtol=0, atol=1e-3)


def test_texture_block_is_standardised_and_scaled_against_the_features(anchor):
    """With `memory_texture` = w, the texture columns of the memory (every candidate kept) have mean 0
    and standard deviation w·√(total variance of the features)/√(channels) per channel over the
    training positions, and the map reads the same scaling."""
    model, cfg, train, calib, _ = anchor
    cfg = dataclasses.replace(cfg, memory_texture=2.0)
    cal = calibrate(model, cfg, train, calib, CPU, maps=("memory",))
    state = cal["fitted"]["memory"]
    bank, width = state["bank"], memory_module.TEXTURE_CHANNELS
    spread = bank[:, :-width].var(0).sum().sqrt()
    assert state["texture"]["scale"] == pytest.approx(2.0 * float(spread) / width**0.5, rel=1e-4)
    texture = bank[:, -width:]
    torch.testing.assert_close(texture.mean(0), torch.zeros(width), rtol=0, atol=1e-3)
    torch.testing.assert_close(
        texture.std(0), torch.full((width,), state["texture"]["scale"]), rtol=1e-3, atol=0
    )
    # A training image's own positions are in the memory with its texture: distance near 0.
    assert MapMaker(model, cfg, cal, CPU, maps=("memory",)).raw(train[:1])["memory"].abs().max() < 5e-3


def test_training_and_prediction_import_neither_torchvision_nor_scikit_learn():
    """`cavga train` and `cavga predict` keep their imports light: torchvision (which brings
    torch._dynamo and Triton, about 160 MB) and scikit-learn (about 100 MB) are imported only where
    they are needed (ImageNet weights, datasets, metrics)."""
    code = (
        "import sys, cavga, cavga.cli, cavga.engine.train, cavga.engine.predict\n"
        "print(' '.join(m for m in ('torchvision', 'sklearn', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
