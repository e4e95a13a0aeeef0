"""Synthetic anomalies: the mask is exactly the changed pixels, for every kind, and everything is seeded."""

import math

import pytest
import torch
import torch.nn.functional as F

from cavga.data import KINDS, perlin_masks, perlin_noise, synthesize
from cavga.data.synthetic import MASK_MAX_FRACTION, MASK_MIN_FRACTION, MIN_CHANGE

SIZE = 24
SEEDS = (0, 1, 2, 3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured(batch: int, channels: int, size: int = SIZE, seed: int = 100) -> torch.Tensor:
    """Smooth random images with some fine structure, values in [0.05, 0.95] (like real normal images)."""
    g = gen(seed)
    coarse = F.interpolate(
        torch.rand(batch, channels, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=True
    )
    fine = torch.rand(batch, channels, size, size, generator=g)
    return (0.05 + 0.9 * (0.7 * coarse + 0.3 * fine)).clamp(0.05, 0.95)


def changed(x: torch.Tensor, x_aug: torch.Tensor) -> torch.Tensor:
    return (x_aug - x).abs().amax(1) > 0


def check_exact(x: torch.Tensor, x_aug: torch.Tensor, mask: torch.Tensor) -> None:
    """The key guarantee, plus shapes, dtypes and range."""
    b, _, h, w = x.shape
    assert x_aug.shape == x.shape and x_aug.dtype == x.dtype
    assert mask.shape == (b, h, w) and mask.dtype == x.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    inside = mask.bool()
    assert torch.equal(changed(x, x_aug), inside)
    outside = ~inside.unsqueeze(1).expand_as(x)
    assert torch.equal(x_aug[outside], x[outside])  # bit for bit
    assert x_aug.min() >= 0 and x_aug.max() <= 1
    if inside.any():
        # Every masked pixel moves by at least MIN_CHANGE in some channel (float32 rounding aside).
        assert (x_aug - x).abs().amax(1)[inside].min() >= MIN_CHANGE * (1 - 1e-4)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_changed_pixels(kind: str, channels: int) -> None:
    x = textured(4, channels)
    for seed in SEEDS:
        x_aug, mask = synthesize(x, gen(seed), p=1.0, kinds=(kind,))
        check_exact(x, x_aug, mask)
        area = mask.flatten(1).sum(1)
        assert (area > 0).all() and (area < SIZE * SIZE).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_flat_images_still_get_exact_visible_masks(kind: str, value: float) -> None:
    # A fill equal to the original (a pasted copy of a flat image, a warp of a flat image) and clipping at 0
    # or 1 leave pixels unchanged; the minimum change must put them back in agreement with the mask.
    x = torch.full((3, 3, 16, 16), value)
    for seed in SEEDS:
        x_aug, mask = synthesize(x, gen(seed), p=1.0, kinds=(kind,))
        check_exact(x, x_aug, mask)
        area = mask.flatten(1).sum(1)
        assert (area > 0).all() and (area < 16 * 16).all()


def test_all_kinds_mixed_and_p_between() -> None:
    x = textured(12, 3)
    for seed in SEEDS:
        x_aug, mask = synthesize(x, gen(seed), p=0.5)
        check_exact(x, x_aug, mask)
        # Images without an anomaly are returned as they were.
        clean = mask.flatten(1).sum(1) == 0
        assert torch.equal(x_aug[clean], x[clean])


@pytest.mark.parametrize("channels", [1, 3])
def test_p0_leaves_every_image_unchanged(channels: int) -> None:
    x = textured(5, channels)
    x_aug, mask = synthesize(x, gen(0), p=0.0)
    assert torch.equal(x_aug, x)
    assert not mask.any() and mask.shape == (5, SIZE, SIZE)


def test_p1_gives_every_image_an_anomaly() -> None:
    x = textured(16, 1)
    for seed in SEEDS:
        _, mask = synthesize(x, gen(seed), p=1.0)
        area = mask.flatten(1).sum(1)
        assert (area > 0).all() and (area < SIZE * SIZE).all()


@pytest.mark.parametrize("kind", KINDS)
def test_seeded(kind: str) -> None:
    x = textured(4, 3)
    a_img, a_mask = synthesize(x, gen(7), p=1.0, kinds=(kind,))
    b_img, b_mask = synthesize(x, gen(7), p=1.0, kinds=(kind,))
    c_img, c_mask = synthesize(x, gen(8), p=1.0, kinds=(kind,))
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert not (torch.equal(a_img, c_img) and torch.equal(a_mask, c_mask))


def test_no_global_random_state_is_used() -> None:
    x = textured(6, 3)
    torch.manual_seed(1)
    first = synthesize(x, gen(5), p=0.7)
    torch.manual_seed(2)
    second = synthesize(x, gen(5), p=0.7)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_input_is_not_modified(kind: str) -> None:
    for channels in (1, 3):
        x = textured(4, channels)
        before = x.clone()
        synthesize(x, gen(0), p=1.0, kinds=(kind,))
        assert torch.equal(x, before)


@pytest.mark.parametrize("kind", KINDS)
def test_anomalies_are_visible(kind: str) -> None:
    # Mean |x_aug - x| inside the masks: several grey levels for every kind, on every image at least the
    # guaranteed minimum.
    x = textured(8, 3, size=32)
    for seed in SEEDS:
        x_aug, mask = synthesize(x, gen(seed), p=1.0, kinds=(kind,))
        diff = (x_aug - x).abs().amax(1)
        inside = mask.bool()
        assert diff[inside].mean() >= 8 / 255
        per_image = (diff * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
        assert per_image.min() >= MIN_CHANGE * (1 - 1e-4)


def test_foreign_patch_with_a_batch_of_one() -> None:
    for channels in (1, 3):
        x = textured(1, channels)
        for seed in SEEDS:
            x_aug, mask = synthesize(x, gen(seed), p=1.0, kinds=("foreign-patch",))
            check_exact(x, x_aug, mask)
            assert mask.any()


def test_other_dtypes_and_shapes() -> None:
    x = textured(4, 3)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        x_aug, mask = synthesize(xd, gen(0), p=1.0)
        check_exact(xd, x_aug, mask)
    # Non-square images and other channel counts work too.
    x = textured(4, 2, size=32)[:, :, :, :20].contiguous()
    x_aug, mask = synthesize(x, gen(0), p=1.0)
    check_exact(x, x_aug, mask)
    assert mask.flatten(1).sum(1).min() > 0


def test_empty_batch() -> None:
    x_aug, mask = synthesize(torch.zeros(0, 1, 16, 16), gen(0), p=1.0)
    assert x_aug.shape == (0, 1, 16, 16) and mask.shape == (0, 16, 16)


def test_bad_arguments_raise_value_error() -> None:
    x = textured(2, 1)
    with pytest.raises(ValueError, match="unknown anomaly kind") as info:
        synthesize(x, gen(0), kinds=("texture", "scratch"))
    assert "'scratch'" in str(info.value)
    assert all(kind in str(info.value) for kind in KINDS)
    with pytest.raises(ValueError, match="non-empty"):
        synthesize(x, gen(0), kinds=())
    with pytest.raises(ValueError):
        synthesize(x, gen(0), kinds="texture")  # a bare string, not a tuple of names
    with pytest.raises(ValueError, match="probability"):
        synthesize(x, gen(0), p=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        synthesize(x * 2 + 0.5, gen(0))
    with pytest.raises(ValueError, match="B, C, H, W"):
        synthesize(x[0], gen(0))
    with pytest.raises(ValueError, match="8x8"):
        synthesize(torch.zeros(1, 1, 4, 4), gen(0))


def test_perlin_masks_coverage_shape_and_seed() -> None:
    for size, low, high in [(32, MASK_MIN_FRACTION, MASK_MAX_FRACTION), (16, 0.1, 0.2), (64, 0.01, 0.9)]:
        for seed in SEEDS:
            masks = perlin_masks(10, size, gen(seed), min_fraction=low, max_fraction=high)
            assert masks.shape == (10, size, size) and masks.dtype == torch.bool
            count = masks.flatten(1).sum(1)
            assert (count >= max(1, math.ceil(low * size * size))).all()
            assert (count <= math.floor(high * size * size)).all()
            assert (count < size * size).all()
    assert torch.equal(perlin_masks(6, 32, gen(3)), perlin_masks(6, 32, gen(3)))
    assert not torch.equal(perlin_masks(6, 32, gen(3)), perlin_masks(6, 32, gen(4)))
    assert perlin_masks(0, 32, gen(0)).shape == (0, 32, 32)
    # Sizes above the noise resolution are upsampled and must keep the guarantees.
    masks = perlin_masks(3, 100, gen(0), min_fraction=0.05, max_fraction=0.06)
    fraction = masks.flatten(1).float().mean(1)
    assert (fraction >= 0.05).all() and (fraction <= 0.06).all()


def test_perlin_masks_reject_impossible_ranges() -> None:
    with pytest.raises(ValueError):
        perlin_masks(2, 16, gen(0), min_fraction=0.5, max_fraction=0.4)
    with pytest.raises(ValueError):
        perlin_masks(2, 16, gen(0), min_fraction=0.0, max_fraction=0.4)
    with pytest.raises(ValueError):
        perlin_masks(2, 2, gen(0), min_fraction=0.3, max_fraction=0.4)  # no count of 4 pixels fits


def test_perlin_noise() -> None:
    noise = perlin_noise((40, 30), (4, 3), gen(0))
    assert noise.shape == (40, 30) and noise.dtype == torch.float32
    assert noise.abs().max() <= 1.0 + 1e-5 and noise.std() > 0.1
    assert noise[0, 0] == 0  # a lattice point: gradient noise is zero there
    assert torch.equal(noise, perlin_noise((40, 30), (4, 3), gen(0)))
    assert not torch.equal(noise, perlin_noise((40, 30), (4, 3), gen(1)))
    # Smooth: neighbouring pixels differ far less than the noise's range.
    assert (noise[1:] - noise[:-1]).abs().max() < 0.5
    # Shapes that are not multiples of res work too.
    assert perlin_noise((17, 23), (3, 5), gen(0)).shape == (17, 23)
    with pytest.raises(ValueError):
        perlin_noise((16, 16), (0, 2), gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_a_cpu_generator() -> None:
    x = textured(6, 3).cuda()
    x_aug, mask = synthesize(x, gen(0), p=1.0)
    assert x_aug.is_cuda and mask.is_cuda
    check_exact(x, x_aug, mask)
