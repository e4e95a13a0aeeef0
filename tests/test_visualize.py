"""Pictures: shapes, colours, contours and the saved PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries

from cavga.visualize import (
    GT_COLOR,
    PANEL_PAD,
    PRED_COLOR,
    draw_contour,
    heatmap,
    overlay,
    panel_scale,
    save_map_png,
    save_mask_png,
    save_panel,
    save_png,
)


def ramp(h: int = 32, w: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, w), (h, 1))


def square_mask(h: int = 32, w: int = 32) -> np.ndarray:
    mask = np.zeros((h, w))
    mask[8:20, 10:22] = 1
    return mask


def test_heatmap_shape_dtype_and_ends() -> None:
    rgb = heatmap(ramp(4, 9))
    assert rgb.shape == (4, 9, 3) and rgb.dtype == np.uint8
    # Jet-like: low values dark blue, high values dark red.
    assert tuple(rgb[0, 0]) == (0, 0, 128)
    assert tuple(rgb[0, -1]) == (128, 0, 0)


@pytest.mark.parametrize("shape", [(16, 20), (16, 20, 3)])
def test_overlay_shapes_and_alpha(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).random(shape)
    anomaly = ramp(16, 20)
    out = overlay(image, anomaly)
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    grey_or_rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    np.testing.assert_array_equal(overlay(image, anomaly, 0.0), np.round(grey_or_rgb * 255))
    np.testing.assert_array_equal(overlay(image, anomaly, 1.0), heatmap(anomaly))


def test_draw_contour_paints_exactly_the_boundary() -> None:
    base = np.full((32, 32, 3), 7, dtype=np.uint8)
    mask = square_mask()
    out = draw_contour(base, mask, (255, 0, 0))
    expected = find_boundaries(mask > 0.5, mode="inner")
    painted = np.all(out == (255, 0, 0), axis=-1)
    np.testing.assert_array_equal(painted, expected)
    np.testing.assert_array_equal(out[~expected], base[~expected])
    assert np.all(base == 7)  # the input is not modified


def test_draw_contour_closes_at_image_border() -> None:
    mask = np.zeros((10, 10))
    mask[:4, :4] = 1  # touches the top and left edges
    out = draw_contour(np.zeros((10, 10, 3), dtype=np.uint8), mask, (0, 255, 0))
    painted = np.all(out == (0, 255, 0), axis=-1)
    assert painted[0, :4].all() and painted[:4, 0].all()
    assert not painted[1:3, 1:3].any()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("rgb_input", [False, True])
@pytest.mark.parametrize("with_gt", [False, True])
def test_save_panel_writes_five_tiles(tmp_path: Path, rgb_input: bool, with_gt: bool) -> None:
    rng = np.random.default_rng(1)
    shape = (32, 32, 3) if rgb_input else (32, 32)
    image = rng.random(shape)
    anomaly = ramp()
    pred = square_mask()
    gt = np.roll(square_mask(), 3, axis=0) if with_gt else None
    path = tmp_path / "sub" / "panel.png"
    save_panel(path, image, rng.random(shape), rng.random((8, 8)), anomaly, pred, gt, "x.png 0.7")

    panel = read_png(path)
    tile = 32 * panel_scale(32, 32)
    assert tile >= 128
    assert panel.shape[1] == 5 * tile + 6 * PANEL_PAD
    assert panel.shape[0] > tile
    red = np.all(panel == PRED_COLOR, axis=-1).sum()
    green = np.all(panel == GT_COLOR, axis=-1).sum()
    assert red > 0
    assert (green > 0) == with_gt


def test_save_panel_large_image_is_not_enlarged(tmp_path: Path) -> None:
    image = np.zeros((150, 140))
    path = tmp_path / "big.png"
    save_panel(path, image, None, None, np.zeros((150, 140)), np.zeros((150, 140)), None)
    assert read_png(path).shape[1] == 5 * 140 + 6 * PANEL_PAD


def test_save_map_and_mask_png(tmp_path: Path) -> None:
    anomaly = ramp(4, 6)
    save_map_png(tmp_path / "map.png", anomaly)
    with Image.open(tmp_path / "map.png") as img:
        assert img.mode == "L"
        grey = np.asarray(img)
    np.testing.assert_array_equal(grey, np.round(anomaly * 255).astype(np.uint8))

    mask = square_mask(24, 24).astype(bool)
    save_mask_png(tmp_path / "mask.png", mask)
    with Image.open(tmp_path / "mask.png") as img:
        stored = np.asarray(img)
    assert set(np.unique(stored).tolist()) == {0, 255}
    np.testing.assert_array_equal(stored == 255, mask)


def test_save_png_is_lossless_and_uses_the_fast_level(tmp_path: Path) -> None:
    """A noisy colour image (which zlib's levels compress differently) comes back pixel for pixel,
    in the bytes Pillow writes at level 1, not those of its default level, and nested folders are made."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    pixels[:, :30] //= 16  # a smoother half, so the levels differ
    image = Image.fromarray(pixels)
    path = tmp_path / "a" / "b" / "x.png"
    save_png(image, path)
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(img), pixels)
    fast, default = tmp_path / "fast.png", tmp_path / "default.png"
    image.save(fast, format="PNG", compress_level=1)
    image.save(default, format="PNG")
    assert path.read_bytes() == fast.read_bytes() != default.read_bytes()
