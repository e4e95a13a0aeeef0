"""Tests for the built-in demo dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cavga.data import (
    DEFECT_TYPES,
    category_dir,
    list_categories,
    list_split,
    make_demo_data,
    validate_images,
)
from cavga.errors import DataError

SIZE = 32
SMALL = {"image_size": SIZE, "n_train": 4, "n_test_good": 3, "n_test_defect": 3}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im, dtype=np.float32)


def test_layout(demo_root: Path) -> None:
    assert list_categories(demo_root) == ["brick", "grass", "gravel"]
    assert "CC0" in (demo_root / "README.txt").read_text()
    for name in list_categories(demo_root):
        cat = category_dir(demo_root, name)
        train = list_split(cat, "train")
        assert len(train) == 4 and all(s.label == 0 for s in train)
        test = list_split(cat, "test")
        types = {s.defect_type for s in test}
        assert types == {"good", *DEFECT_TYPES}
        assert sum(s.label == 0 for s in test) == 3
        validate_images(train + test)
        for s in test:
            assert _grey(s.path).shape == (SIZE, SIZE)
            if s.label == 0:
                continue
            assert s.defect_type in DEFECT_TYPES
            assert s.mask_path is not None and s.mask_path.name == f"{s.path.stem}_mask.png"
            mask = _grey(s.mask_path)
            assert mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask).tolist()) <= {0.0, 255.0}
            assert 0.005 <= (mask > 127).mean() <= 0.30, s.mask_path


def test_same_seed_same_bytes(tmp_path: Path, demo_root: Path) -> None:
    again = make_demo_data(tmp_path / "again", seed=0, **SMALL)
    assert _files(again) == _files(demo_root)
    other = make_demo_data(tmp_path / "other", seed=1, **SMALL)
    a, b = _files(other), _files(demo_root)
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in images) > 0.9 * len(images)


def test_defects_change_the_texture(demo_root: Path) -> None:
    for name in list_categories(demo_root):
        for s in list_split(demo_root / name, "test"):
            if s.label == 0:
                continue
            img, mask = _grey(s.path), _grey(s.mask_path) > 127
            if s.defect_type == "hole":
                # A hole is dark: well below the rest of the image.
                assert img[mask].mean() < img[~mask].mean() - 30, s.path
            if s.defect_type == "stain":
                assert img[mask].mean() < img[~mask].mean(), s.path


def test_defect_differs_from_its_normal_crop(demo_root: Path) -> None:
    # Defect pixels stand out from the texture statistics of the same category's normal images.
    for name in list_categories(demo_root):
        test = list_split(demo_root / name, "test")
        normal = np.stack([_grey(s.path) for s in test if s.label == 0])
        lo, hi = np.percentile(normal, [1, 99])
        for defect in ("scratch", "hole"):
            for s in (s for s in test if s.defect_type == defect):
                img, mask = _grey(s.path), _grey(s.mask_path) > 127
                outside = ((img < lo) | (img > hi))[mask].mean()
                assert outside > 0.3, (s.path, outside)


def test_rewrites_previous_demo_but_not_other_folders(tmp_path: Path) -> None:
    out = make_demo_data(tmp_path / "d", seed=0, **{**SMALL, "n_train": 6})
    make_demo_data(out, seed=0, **SMALL, categories=("grass",))
    assert list_categories(out) == ["grass"]
    assert len(list_split(out / "grass", "train")) == 4
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(DataError) as exc:
        make_demo_data(busy, **SMALL)
    assert str(busy) in str(exc.value)
    assert (busy / "mine.txt").read_text() == "keep me"


def test_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        make_demo_data(tmp_path / "x", categories=("marble",), **SMALL)
    assert "marble" in str(exc.value) and "brick" in str(exc.value)
