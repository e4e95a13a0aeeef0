"""A small built-in dataset: real textures with synthetic defects and exact masks.

The normal images are crops of greyscale texture photographs shipped with scikit-image
(brick, grass, gravel; public domain / CC0). Defects are painted on held-out crops, and the
masks are exactly the pixels that were changed, so pixel-level metrics are meaningful.
The result uses the MVTec AD layout read by :mod:`cavga.data.folder`.
"""

from __future__ import annotations

import math
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cavga.errors import DataError

DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "hole", "patch", "color")
DEMO_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")

_README_MARKER = "cavga demo dataset"
# Training crops come from the top rows of each texture, test crops from the rest, so test
# images (normal ones included) show texture the model has never seen.
_TRAIN_ROWS_FRACTION = 0.6
# Crop side in source pixels: 0.6-0.8 of a 256 px window. The upper bound is what fits in
# the held-out test rows (40% of 512), so train and test crops share one scale distribution.
_CROP_MIN, _CROP_MAX = 154, 204


def _load_texture(name: str) -> np.ndarray:
    import skimage.data  # imported lazily: it is only needed to build the demo

    loader = getattr(skimage.data, name, None)
    if name not in DEMO_CATEGORIES or loader is None:
        raise DataError(f"unknown demo category {name!r}; available: {', '.join(DEMO_CATEGORIES)}")
    tex = np.asarray(loader())
    if tex.ndim != 2:
        raise DataError(f"scikit-image texture {name!r} is not greyscale (shape {tex.shape})")
    return tex.astype(np.uint8)


def _crop(rng: np.random.Generator, tex: np.ndarray, rows: tuple[int, int], size: int) -> np.ndarray:
    """Random square crop within ``rows``, randomly flipped, resized to ``size`` (float32)."""
    side = int(rng.integers(_CROP_MIN, min(_CROP_MAX, rows[1] - rows[0]) + 1))
    r0 = int(rng.integers(rows[0], rows[1] - side + 1))
    c0 = int(rng.integers(0, tex.shape[1] - side + 1))
    patch = tex[r0 : r0 + side, c0 : c0 + side]
    # Flips only: 90-degree turns would make brick courses vertical, which is not "normal".
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    im = Image.fromarray(np.ascontiguousarray(patch))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _blob(rng: np.random.Generator, size: int, area: float, wobble: float) -> np.ndarray:
    """Normalised radius of a random, irregular ellipse: < 1 inside, covering ~``area``."""
    aspect = rng.uniform(0.5, 1.0)
    a = math.sqrt(area * size * size / (math.pi * aspect))
    b = a * aspect
    # Centres anywhere, so defects may be cut by the border: with defects kept inside the image,
    # a fixed centre-weighted map would already score a pixel AUROC near 0.8.
    cy, cx = rng.uniform(0, size, size=2)
    theta = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
    ang = np.arctan2(v, u)
    # Low angular harmonics bend the outline so blobs are not perfect ellipses.
    edge = np.ones_like(ang)
    for k in (2, 3, 5):
        edge += rng.uniform(0, wobble / 2) * np.cos(k * ang + rng.uniform(0, 2 * math.pi))
    return np.sqrt(u * u + v * v) / edge


def _scratch(
    rng: np.random.Generator, img: np.ndarray, size: int, other: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(rng.uniform(2, 4) * size / 128))
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.3, 0.6) * size
        p0 = rng.uniform(0, size, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        p2 = np.clip(p0 + length * np.array([math.cos(angle), math.sin(angle)]), 2, size - 3)
        normal = np.array([-math.sin(angle), math.cos(angle)])
        p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.3, 0.3) * length
        t = np.linspace(0, 1, 32)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        draw.line([tuple(p) for p in pts.tolist()], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 127
    # Near-white or near-black, so the line stands out even on bright gravel or dark grass.
    target = rng.uniform(235, 255) if rng.random() < 0.5 else rng.uniform(0, 20)
    out = img.copy()
    out[mask] = 0.1 * img[mask] + 0.9 * target
    return out, mask


def _stain(
    rng: np.random.Generator, img: np.ndarray, size: int, other: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    r = _blob(rng, size, rng.uniform(0.02, 0.08), wobble=0.3)
    soft = 0.12
    alpha = np.clip(0.5 + (1 - r) / (2 * soft), 0, 1)
    # The mask is alpha > 0.5, where the darkening is at least half its full strength.
    out = img * (1 - rng.uniform(0.35, 0.55) * alpha)
    return out, r < 1


def _hole(
    rng: np.random.Generator, img: np.ndarray, size: int, other: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    r = _blob(rng, size, rng.uniform(0.02, 0.08), wobble=0.15)
    mask = r < 1
    dark = rng.uniform(12, 30)
    # A lighter band just inside the edge reads as the rim of the hole.
    rim = np.clip((r - 0.7) / 0.3, 0, 1) * rng.uniform(25, 45)
    inside = dark + rim + 0.08 * (img - img.mean()) + rng.normal(0, 1.5, size=img.shape)
    out = np.where(mask, inside, img)
    return out, mask


def _patch(
    rng: np.random.Generator, img: np.ndarray, size: int, other: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    area = rng.uniform(0.03, 0.09) * size * size
    aspect = rng.uniform(0.6, 1.6)
    w = int(np.clip(round(math.sqrt(area * aspect)), 2, 0.45 * size))
    h = int(np.clip(round(area / w), 2, 0.45 * size))
    y0 = max(0, int(rng.integers(-h // 2, size - h // 2)))
    x0 = max(0, int(rng.integers(-w // 2, size - w // 2)))
    # Texture from another material, i.e. a piece that does not belong here.
    src = _crop(rng, other[int(rng.integers(len(other)))], (0, 512), size)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    out = np.where(mask, src, img)
    return out, mask


def _color(
    rng: np.random.Generator, img: np.ndarray, size: int, other: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, size, rng.uniform(0.03, 0.09), wobble=0.2) < 1
    mean = img[mask].mean()
    contrast = rng.uniform(0.2, 0.4)
    shift = rng.uniform(25, 45) * (1 if rng.random() < 0.5 else -1)
    out = img.copy()
    out[mask] = mean + (img[mask] - mean) * contrast + shift
    return out, mask


_DefectFn = Callable[[np.random.Generator, np.ndarray, int, list[np.ndarray]], tuple[np.ndarray, np.ndarray]]
_DEFECTS: dict[str, _DefectFn] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "patch": _patch,
    "color": _color,
}


def _save(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(path)


def _prepare_out(out: Path) -> None:
    """Create ``out``; replace a previous demo there, refuse to mix with other content."""
    if out.exists() and not out.is_dir():
        raise DataError(f"cannot write demo data to {out}: it is a file")
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.txt"
        if not (readme.is_file() and readme.read_text(errors="replace").startswith(_README_MARKER)):
            raise DataError(
                f"cannot write demo data to {out}: the folder is not empty and does not hold a "
                "previous demo dataset; choose an empty or new folder"
            )
        # A previous demo: remove only what a demo writes, so stale images cannot linger.
        for child in out.iterdir():
            if child.is_dir() and ((child / "train").is_dir() or (child / "test").is_dir()):
                shutil.rmtree(child)
        readme.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _readme(
    seed: int,
    image_size: int,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    categories: tuple[str, ...],
) -> str:
    return (
        f"{_README_MARKER} (written by cavga.data.make_demo_data)\n\n"
        "Normal images are random crops of greyscale texture photographs shipped with\n"
        "scikit-image (skimage.data.brick, grass and gravel; public domain / CC0).\n"
        f"Training crops come from the top {int(_TRAIN_ROWS_FRACTION * 100)}% of each texture, "
        "test crops from the rest.\n"
        "Defects are synthetic; each mask marks exactly the pixels that were changed.\n\n"
        f"categories: {', '.join(categories)}\n"
        f"defect types: {', '.join(DEFECT_TYPES)}\n"
        f"seed: {seed}\nimage size: {image_size}x{image_size}\n"
        f"per category: {n_train} train/good, {n_test_good} test/good, "
        f"{n_test_defect} per defect type\n\n"
        "Layout (MVTec AD): <category>/train/good/NNN.png, <category>/test/<type>/NNN.png,\n"
        "<category>/ground_truth/<type>/NNN_mask.png (255 = defect).\n"
    )


def make_demo_data(
    out: str | Path,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 80,
    n_test_good: int = 20,
    n_test_defect: int = 8,
    categories: tuple[str, ...] = DEMO_CATEGORIES,
) -> Path:
    """Write the demo dataset (MVTec AD layout) and return its root folder.

    Args:
        out: Dataset root to create. It must be empty, new, or hold a previous demo
            (which is replaced).
        seed: Random seed; the same arguments give byte-identical files.
        image_size: Side of the square images in pixels.
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_defect: Test images per defect type and category.
        categories: Textures to use, from ``DEMO_CATEGORIES``.

    Returns:
        ``Path(out)``.

    Raises:
        DataError: For an unknown category or an unusable output folder.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if min(n_train, n_test_good, n_test_defect) < 1:
        raise ValueError("n_train, n_test_good and n_test_defect must be at least 1")
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be non-empty and unique, got {categories!r}")
    textures = {name: _load_texture(name) for name in DEMO_CATEGORIES}
    for name in categories:
        if name not in textures:
            raise DataError(f"unknown demo category {name!r}; available: {', '.join(DEMO_CATEGORIES)}")
    out = Path(out)
    _prepare_out(out)
    for name in categories:
        tex = textures[name]
        others = [t for n, t in textures.items() if n != name]
        split_row = round(tex.shape[0] * _TRAIN_ROWS_FRACTION)
        train_rows, test_rows = (0, split_row), (split_row, tex.shape[0])
        # One stream per category: its images do not depend on which others are made.
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        cat = out / name
        folder = cat / "train" / "good"
        folder.mkdir(parents=True)
        for i in range(n_train):
            _save(_crop(rng, tex, train_rows, image_size), folder / f"{i:03d}.png")
        folder = cat / "test" / "good"
        folder.mkdir(parents=True)
        for i in range(n_test_good):
            _save(_crop(rng, tex, test_rows, image_size), folder / f"{i:03d}.png")
        min_pixels = max(4, math.ceil(0.005 * image_size * image_size))
        for defect in DEFECT_TYPES:
            img_dir, mask_dir = cat / "test" / defect, cat / "ground_truth" / defect
            img_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for i in range(n_test_defect):
                base = _crop(rng, tex, test_rows, image_size)
                # Redraw the rare defect that came out too small to see (e.g. a clipped scratch).
                while True:
                    img, mask = _DEFECTS[defect](rng, base, image_size, others)
                    if mask.sum() >= min_pixels:
                        break
                _save(img, img_dir / f"{i:03d}.png")
                _save(mask.astype(np.uint8) * 255, mask_dir / f"{i:03d}_mask.png")
    (out / "README.txt").write_text(
        _readme(seed, image_size, n_train, n_test_good, n_test_defect, categories)
    )
    return out
