"""Pictures of results: colour-mapped anomaly maps, overlays, contours and summary panels.

Images are float arrays in [0, 1], either ``(H, W)`` grey or ``(H, W, 3)`` RGB; maps and masks
are ``(H, W)``. Everything is drawn with numpy, scikit-image and Pillow (no matplotlib).
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries
from skimage.transform import resize

__all__ = [
    "PANEL_LABELS",
    "PANEL_PAD",
    "chw_to_image",
    "draw_contour",
    "heatmap",
    "overlay",
    "panel_scale",
    "save_grid",
    "save_map_png",
    "save_mask_png",
    "save_panel",
    "save_png",
]

PANEL_LABELS = ("input", "reconstruction", "attention", "anomaly map", "prediction")
#: Pixels of background between tiles and around the panel.
PANEL_PAD = 4
#: Smallest tile side; smaller inputs are enlarged by an integer factor (nearest neighbour).
MIN_TILE = 128
_LABEL_HEIGHT = 14  # the default PIL bitmap font is about 11 px tall
_TITLE_HEIGHT = 16
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
PRED_COLOR = (255, 0, 0)
GT_COLOR = (0, 255, 0)
# zlib level of every PNG we write. At Pillow's default (6) a test panel of 664 × 166 took 36 ms to
# encode, at level 1 9 ms, for a file 13 % larger; `cavga test` of ELPV poly's 586 images went from
# 108 s to 82 s (the older 2-core EPYC).
PNG_COMPRESS_LEVEL = 1

# Jet-like colour map: dark blue -> blue -> cyan -> yellow -> red -> dark red.
_JET_POS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array(
    [
        [0.0, 0.0, 0.5],
        [0.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.5, 0.0, 0.0],
    ]
)


def chw_to_image(chw: np.ndarray) -> np.ndarray:
    """(C, H, W) tensor layout to an (H, W) grey or (H, W, 3) colour image array."""
    hwc = np.asarray(chw).transpose(1, 2, 0)
    return hwc[..., 0] if hwc.shape[-1] == 1 else hwc


def _to_unit(values: np.ndarray) -> np.ndarray:
    """Float copy clipped to [0, 1], with NaN as 0 (so a bad pixel cannot break a picture)."""
    return np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Image as float ``(H, W, 3)`` in [0, 1]; accepts grey, ``(H, W, 1)``, RGB or uint8."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image / 255.0
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W) or (H, W, 3); got {image.shape}")
    return _to_unit(image)


def _plane(values: np.ndarray) -> np.ndarray:
    """Drop leading and trailing length-1 axes down to two, so (1, H, W) and (H, W, 1) become
    (H, W) but a 1×1 map stays 1×1 (np.squeeze would make it a scalar)."""
    values = np.asarray(values)
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    while values.ndim > 2 and values.shape[-1] == 1:
        values = values[..., 0]
    return values


def _as_map(anomaly_map: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Map as float ``(H, W)`` in [0, 1], resized (bilinear) to ``shape`` when it differs."""
    values = _to_unit(_plane(anomaly_map))
    if values.ndim != 2:
        raise ValueError(f"anomaly map must have shape (H, W); got {np.shape(anomaly_map)}")
    if shape is not None and values.shape != tuple(shape):
        values = resize(values, shape, order=1, mode="edge", anti_aliasing=False)
    return values


def heatmap(anomaly_map: np.ndarray) -> np.ndarray:
    """Colour-map a ``[0, 1]`` map with a jet-like palette.

    Args:
        anomaly_map: ``(H, W)`` values in [0, 1] (clipped; NaN shown as 0).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    values = _as_map(anomaly_map)
    rgb = np.stack([np.interp(values, _JET_POS, _JET_RGB[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-mapped anomaly map over an image.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` float in [0, 1].
        anomaly_map: ``(H, W)`` in [0, 1]; resized to the image when its size differs.
        alpha: Weight of the heat map (0 shows only the image, 1 only the map).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    rgb = _as_rgb(image)
    heat = heatmap(_as_map(anomaly_map, rgb.shape[:2])) / 255.0
    blended = (1.0 - alpha) * rgb + alpha * heat
    return np.round(np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8)


def draw_contour(rgb_uint8: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Paint the inner boundary pixels of a mask onto an RGB image.

    Boundaries come from :func:`skimage.segmentation.find_boundaries` (``mode="inner"``) on the
    mask padded with background, so a region touching the image border gets a closed contour.

    Args:
        rgb_uint8: ``(H, W, 3)`` uint8 image (not modified).
        mask: ``(H, W)`` mask; values > 0.5 are inside.
        color: RGB colour of the contour.

    Returns:
        A copy of the image with the contour painted.
    """
    out = np.array(rgb_uint8, dtype=np.uint8, copy=True)
    inside = np.asarray(mask) > 0.5
    if inside.shape != out.shape[:2]:
        raise ValueError(f"mask shape {inside.shape} does not match image {out.shape[:2]}")
    boundary = find_boundaries(np.pad(inside, 1), mode="inner")[1:-1, 1:-1]
    out[boundary] = color
    return out


def panel_scale(height: int, width: int) -> int:
    """Integer enlargement factor that makes the shorter side of a tile at least 128 px.

    Args:
        height: Image height.
        width: Image width.

    Returns:
        The factor (1 for images that are already large enough).
    """
    return max(1, math.ceil(MIN_TILE / max(1, min(height, width))))


def _enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor, keeping pixels crisp."""
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def save_panel(
    path: str | PathLike[str],
    image: np.ndarray,
    reconstruction: np.ndarray | None,
    attention: np.ndarray | None,
    anomaly_map: np.ndarray,
    pred_mask: np.ndarray,
    gt_mask: np.ndarray | None,
    title: str = "",
) -> None:
    """Write one PNG with five labelled tiles side by side and a title line on top.

    Tiles: "input"; "reconstruction"; "attention" (overlaid on the input); "anomaly map" (colour
    map); "prediction" (anomaly map overlaid on the input, predicted-mask contour in red and,
    when ``gt_mask`` is given, the ground-truth contour in green). Images whose shorter side is
    below 128 px are enlarged by an integer factor (nearest neighbour). A missing
    reconstruction or attention map leaves its tile blank.

    Args:
        path: Output PNG path (parent folders are created).
        image: Input ``(H, W)`` or ``(H, W, 3)`` in [0, 1].
        reconstruction: Reconstructed image, same layout (resized if its size differs), or None.
        attention: Attention map ``(H, W)`` in [0, 1], or None.
        anomaly_map: Anomaly map ``(H, W)`` in [0, 1].
        pred_mask: Predicted binary mask ``(H, W)``.
        gt_mask: Ground-truth binary mask ``(H, W)``, or None.
        title: Text for the top line, e.g. file name and score.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    factor = panel_scale(height, width)
    big_rgb = _enlarge(rgb, factor)
    big_map = _enlarge(_as_map(anomaly_map, (height, width)), factor)
    blank = np.full_like(big_rgb, 0.5)

    if reconstruction is None:
        recon_tile = blank
    else:
        recon = _as_rgb(reconstruction)
        if recon.shape[:2] != (height, width):
            recon = resize(recon, (height, width), order=1, mode="edge", anti_aliasing=True)
        recon_tile = _enlarge(recon, factor)
    if attention is None:
        attention_tile = blank
    else:
        attention_tile = overlay(big_rgb, _enlarge(_as_map(attention, (height, width)), factor))

    # Contours are drawn after enlarging so they stay one pixel thin on the shown tile.
    prediction = draw_contour(
        overlay(big_rgb, big_map), _enlarge(_as_map(pred_mask, (height, width)), factor), PRED_COLOR
    )
    if gt_mask is not None:
        prediction = draw_contour(prediction, _enlarge(_as_map(gt_mask, (height, width)), factor), GT_COLOR)

    tiles = [big_rgb, recon_tile, attention_tile, heatmap(big_map), prediction]
    tiles = [t if t.dtype == np.uint8 else np.round(t * 255).astype(np.uint8) for t in tiles]

    tile_h, tile_w = big_rgb.shape[:2]
    top = PANEL_PAD + (_TITLE_HEIGHT if title else 0)
    canvas_w = len(tiles) * tile_w + (len(tiles) + 1) * PANEL_PAD
    canvas_h = top + _LABEL_HEIGHT + tile_h + PANEL_PAD
    canvas = Image.new("RGB", (canvas_w, canvas_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PANEL_PAD, PANEL_PAD), title, fill=_TEXT)
    for i, (tile, name) in enumerate(zip(tiles, PANEL_LABELS, strict=True)):
        x = PANEL_PAD + i * (tile_w + PANEL_PAD)
        draw.text((x, top), name, fill=_TEXT)
        canvas.paste(Image.fromarray(tile), (x, top + _LABEL_HEIGHT))

    save_png(canvas, path)


def save_png(image: Image.Image, path: str | PathLike[str]) -> None:
    """Write `image` as a PNG at `PNG_COMPRESS_LEVEL`, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def save_map_png(path: str | PathLike[str], anomaly_map: np.ndarray) -> None:
    """Write a ``[0, 1]`` map as an 8-bit greyscale PNG (0 -> black, 1 -> white).

    Args:
        path: Output PNG path (parent folders are created).
        anomaly_map: ``(H, W)`` values, clipped to [0, 1].
    """
    save_png(map_image(anomaly_map), path)


def map_image(anomaly_map: np.ndarray) -> Image.Image:
    """A ``[0, 1]`` map as an 8-bit greyscale image (0 -> black, 1 -> white)."""
    return Image.fromarray(np.round(_as_map(anomaly_map) * 255).astype(np.uint8))


def prediction_overlay(
    image: Image.Image, anomaly_map: np.ndarray, mask: np.ndarray, grey: bool
) -> Image.Image:
    """The heat map over the image at its own size, with the predicted region outlined."""
    original = np.asarray(image.convert("L" if grey else "RGB")) / 255.0
    return Image.fromarray(draw_contour(overlay(original, anomaly_map), mask, PRED_COLOR))


def save_mask_png(path: str | PathLike[str], mask: np.ndarray) -> None:
    """Write a binary mask as a PNG with values 0 and 255.

    Args:
        path: Output PNG path (parent folders are created).
        mask: ``(H, W)`` mask; values > 0.5 are written as 255.
    """
    binary = np.where(_plane(mask) > 0.5, 255, 0).astype(np.uint8)
    if binary.ndim != 2:
        raise ValueError(f"mask must have shape (H, W); got {np.shape(mask)}")
    save_png(Image.fromarray(binary), path)


def save_grid(path: str | PathLike[str], rows: list[tuple[str, list[np.ndarray]]], title: str = "") -> None:
    """One PNG of labelled rows of equally sized uint8 RGB tiles (e.g. one row of maps per method).

    Args:
        path: Output PNG path (parent folders are created).
        rows: (label, tiles) pairs; each tile is ``(H, W, 3)`` uint8, all of one size.
        title: Optional line above the grid.
    """
    h, w = rows[0][1][0].shape[:2]
    factor = panel_scale(h, w)
    th, tw = h * factor, w * factor
    label_w = 8 + 7 * max(len(label) for label, _ in rows)
    ncols = max(len(tiles) for _, tiles in rows)
    top = _TITLE_HEIGHT if title else 0
    canvas = Image.new(
        "RGB",
        (label_w + ncols * (tw + PANEL_PAD) + PANEL_PAD, top + len(rows) * (th + PANEL_PAD) + PANEL_PAD),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PANEL_PAD, 2), title, fill=_TEXT)
    for r, (label, tiles) in enumerate(rows):
        y = top + PANEL_PAD + r * (th + PANEL_PAD)
        draw.text((PANEL_PAD, y + th // 2 - 6), label, fill=_TEXT)
        for c, tile in enumerate(tiles):
            canvas.paste(
                Image.fromarray(_enlarge(tile, factor)), (label_w + PANEL_PAD + c * (tw + PANEL_PAD), y)
            )
    save_png(canvas, path)
