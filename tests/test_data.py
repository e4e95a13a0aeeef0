"""Tests for the MVTec-AD-layout folder datasets (tiny images written with PIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cavga.data.stream as stream
from cavga.data import (
    ImageDataset,
    Sample,
    category_dir,
    has_masks,
    infer_channels,
    is_grey,
    list_categories,
    list_split,
    load_image,
    load_mask,
    loader,
    scan,
    validate_images,
)
from cavga.errors import DataError

SIZE = 16


def _write(path: Path, value: int = 128, mode: str = "L", size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, rows: int, size: int = SIZE) -> Path:
    """Mask whose top ``rows`` rows are white, so each mask is identifiable by content."""
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[:rows] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _category(root: Path, masks: bool = True) -> Path:
    """train: 3 good; test: 2 good, 2 crack, 1 hole; masks for the anomalous ones."""
    for i in range(3):
        _write(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _write(root / "test" / "good" / f"{i:03d}.png")
    _write(root / "test" / "crack" / "a.png", 200)
    _write(root / "test" / "crack" / "b.png", 50)
    _write(root / "test" / "hole" / "x.png", 10)
    if masks:
        _mask(root / "ground_truth" / "crack" / "a_mask.png", 2)
        _mask(root / "ground_truth" / "crack" / "b_mask.png", 5)
        _mask(root / "ground_truth" / "hole" / "x_mask.png", 8)
    return root


def _message(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value)


# --------------------------------------------------------------------------- listing


def test_counts_labels_types(tmp_path: Path) -> None:
    cat = _category(tmp_path / "bottle")
    train = list_split(cat, "train")
    test = list_split(cat, "test")
    assert len(train) == 3
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert [p.name for p in (s.path for s in train)] == ["000.png", "001.png", "002.png"]
    assert [(s.defect_type, s.label) for s in test] == [
        ("crack", 1),
        ("crack", 1),
        ("good", 0),
        ("good", 0),
        ("hole", 1),
    ]
    assert all((s.mask_path is not None) == (s.label == 1) for s in test)
    assert has_masks(test) and not has_masks(train)


def test_hidden_and_non_image_files_ignored(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    _write(cat / "train" / "good" / ".hidden.png")
    (cat / "train" / "good" / "notes.txt").write_text("hi")
    _write(cat / "train" / "good" / "UPPER.JPG")  # extensions are case-insensitive
    (cat / "test" / ".cache").mkdir()
    names = [s.path.name for s in list_split(cat, "train")]
    assert names == ["000.png", "001.png", "002.png", "UPPER.JPG"]
    assert len(list_split(cat, "test")) == 5


def test_masks_matched_by_stem_not_position(tmp_path: Path) -> None:
    cat = tmp_path
    _write(cat / "train" / "good" / "0.png")
    rows = {"a": 1, "a1": 4, "b": 7}
    for stem in rows:
        _write(cat / "test" / "bad" / f"{stem}.png")
    gt = cat / "ground_truth" / "bad"
    _mask(gt / "a_mask.png", rows["a"])
    _mask(gt / "a1_mask.png", rows["a1"])
    _mask(gt / "b.png", rows["b"])  # a plain "<stem>.png" mask name is accepted too
    # "a.png" < "a1.png" but "a1_mask.png" < "a_mask.png": pairing by position would swap them.
    images = sorted(p.name for p in (cat / "test" / "bad").iterdir())
    masks = sorted(p.name for p in gt.iterdir())
    assert [n.split(".")[0] for n in images] != [n.split("_")[0].split(".")[0] for n in masks]
    samples = list_split(cat, "test")
    assert [s.path.stem for s in samples] == ["a", "a1", "b"]
    for s in samples:
        assert s.mask_path is not None
        mask = load_mask(s.mask_path, s.path, SIZE)
        assert int(mask.sum().item()) == rows[s.path.stem] * SIZE


def test_two_masks_for_one_image(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    extra = _mask(cat / "ground_truth" / "crack" / "a.png", 1)
    with pytest.raises(DataError) as exc:
        list_split(cat, "test")
    msg = _message(exc)
    assert str(extra) in msg and str(cat / "ground_truth" / "crack" / "a_mask.png") in msg


def test_ground_truth_optional(tmp_path: Path) -> None:
    cat = _category(tmp_path, masks=False)
    test = list_split(cat, "test")
    assert all(s.mask_path is None for s in test)
    assert not has_masks(test)
    item = ImageDataset(test, 8, 1, masks=True)[0]
    assert item.error is None and test[item.index].label == 1
    assert torch.equal(item.mask, torch.zeros(8, 8))


# --------------------------------------------------------------------------- categories


def test_categories_root_is_category(tmp_path: Path) -> None:
    cat = _category(tmp_path / "only")
    assert list_categories(cat) == [""]
    assert category_dir(cat, None) == cat
    assert category_dir(cat, "") == cat
    assert category_dir(cat, "only") == cat
    with pytest.raises(DataError) as exc:
        category_dir(cat, "other")
    assert str(cat) in _message(exc)


def test_categories_single_and_named(tmp_path: Path) -> None:
    _category(tmp_path / "bottle")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["bottle"]
    assert category_dir(tmp_path, None) == tmp_path / "bottle"
    _category(tmp_path / "alpha")
    assert list_categories(tmp_path) == ["alpha", "bottle"]
    assert category_dir(tmp_path, "alpha") == tmp_path / "alpha"


def test_ambiguous_root(tmp_path: Path) -> None:
    _category(tmp_path / "bottle")
    _category(tmp_path / "cable")
    with pytest.raises(DataError) as exc:
        category_dir(tmp_path, None)
    msg = _message(exc)
    assert str(tmp_path) in msg and "bottle" in msg and "cable" in msg and "--category" in msg


def test_unknown_category(tmp_path: Path) -> None:
    _category(tmp_path / "bottle")
    with pytest.raises(DataError) as exc:
        category_dir(tmp_path, "carpet")
    msg = _message(exc)
    assert "carpet" in msg and "bottle" in msg and str(tmp_path) in msg


def test_no_dataset_in_root(tmp_path: Path) -> None:
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError) as exc:
        list_categories(tmp_path)
    assert str(tmp_path) in _message(exc) and "train" in _message(exc)
    with pytest.raises(DataError) as exc:
        list_categories(tmp_path / "missing")
    assert str(tmp_path / "missing") in _message(exc)


def test_plain_folder_of_good_images_is_a_training_split(tmp_path: Path) -> None:
    """The likeliest first try, a folder of good images as it came off the line, trains as it is;
    its missing test split is still named when a test needs it."""
    _write(tmp_path / "part2.png")
    _write(tmp_path / "part1.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    assert list_categories(tmp_path) == [""]
    assert category_dir(tmp_path, None) == tmp_path
    samples = list_split(tmp_path, "train")
    assert [(s.path.name, s.label, s.defect_type) for s in samples] == [
        ("part1.png", 0, "good"),
        ("part2.png", 0, "good"),
    ]
    with pytest.raises(DataError) as exc:
        list_split(tmp_path, "test")
    assert str(tmp_path / "test") in _message(exc)


# --------------------------------------------------------------------------- malformed


def test_missing_train_folder(tmp_path: Path) -> None:
    _write(tmp_path / "test" / "good" / "0.png")
    with pytest.raises(DataError) as exc:
        list_split(tmp_path, "train")
    assert str(tmp_path / "train") in _message(exc)


def test_missing_train_good(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as exc:
        list_split(tmp_path, "train")
    assert str(tmp_path / "train" / "good") in _message(exc)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as exc:
        list_split(tmp_path, "train")
    msg = _message(exc)
    assert str(tmp_path / "train" / "good") in msg and "no images" in msg and ".png" in msg


def test_empty_test_type_folder(tmp_path: Path) -> None:
    cat = _category(tmp_path, masks=False)
    (cat / "test" / "scratch").mkdir()
    with pytest.raises(DataError) as exc:
        list_split(cat, "test")
    assert str(cat / "test" / "scratch") in _message(exc)


def test_train_with_other_subfolder(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    _write(cat / "train" / "bad" / "0.png")
    with pytest.raises(DataError) as exc:
        list_split(cat, "train")
    assert str(cat / "train" / "bad") in _message(exc)


def test_mask_without_image(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    orphan = _mask(cat / "ground_truth" / "crack" / "zzz_mask.png", 3)
    with pytest.raises(DataError) as exc:
        list_split(cat, "test")
    assert str(orphan) in _message(exc)


def test_mask_folder_without_test_folder(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    orphan = _mask(cat / "ground_truth" / "dent" / "0_mask.png", 3)
    with pytest.raises(DataError) as exc:
        list_split(cat, "test")
    assert str(orphan) in _message(exc)


def test_anomalous_image_without_mask(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    (cat / "ground_truth" / "crack" / "b_mask.png").unlink()
    with pytest.raises(DataError) as exc:
        list_split(cat, "test")
    msg = _message(exc)
    assert str(cat / "test" / "crack" / "b.png") in msg
    assert str(cat / "ground_truth" / "crack") in msg


def test_undecodable_image(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    bad = cat / "train" / "good" / "001.png"
    bad.write_bytes(b"this is not a png at all")
    samples = list_split(cat, "train")  # listing does not decode
    with pytest.raises(DataError) as exc:
        validate_images(samples)
    assert str(bad) in _message(exc) and "cannot be decoded" in _message(exc)
    with pytest.raises(DataError) as exc:
        load_image(bad, 8, 1)
    assert str(bad) in _message(exc)
    # The dataset returns the reason instead of raising, so a worker process never dies of it.
    item = ImageDataset(samples, 8, 1)[1]
    assert item.image is None and str(bad) in item.error and "cannot be decoded" in item.error
    # Channel inference looks past it (the loaders report it), and so does the scan.
    assert infer_channels(samples) == 1
    source, skipped = scan(samples, 8, 1)
    assert bad not in [s.path for s in source.samples] and len(source) == len(samples) - 1
    assert skipped == [{"file": str(bad), "error": item.error}]
    assert sum(len(x) for x in source.batches(2)) == len(samples) - 1


def test_grey_content_in_colour_files_counts_as_grey() -> None:
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (4, 1))
    rgb = np.dstack([grey, grey, grey])
    assert is_grey(Image.fromarray(rgb))
    rgb[0, 0, 0] += 2  # a JPEG's rounding
    assert is_grey(Image.fromarray(rgb)) and is_grey(Image.fromarray(rgb).convert("CMYK"))
    rgb[0, 0, 0] += 1
    assert not is_grey(Image.fromarray(rgb))


def test_truncated_image(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    arr = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as exc:
        validate_images([Sample(path, 0, "good", None)])
    assert str(path) in _message(exc)


def test_undecodable_mask(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    bad = cat / "ground_truth" / "hole" / "x_mask.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError) as exc:
        load_mask(bad, cat / "test" / "hole" / "x.png", 8)
    assert str(bad) in _message(exc)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    cat = _category(tmp_path)
    bad = _mask(cat / "ground_truth" / "hole" / "x_mask.png", 3, size=20)
    image = cat / "test" / "hole" / "x.png"
    with pytest.raises(DataError) as exc:
        load_mask(bad, image, 8)
    msg = _message(exc)
    assert str(bad) in msg and str(image) in msg and "20x20" in msg and "16x16" in msg
    samples = list_split(cat, "test")
    with pytest.raises(DataError) as exc:
        validate_images(samples)
    assert str(bad) in _message(exc)


# --------------------------------------------------------------------------- loading


def test_load_image_grey_and_rgb(tmp_path: Path) -> None:
    grey = _write(tmp_path / "g.png", 255)
    rgb = tmp_path / "c.png"
    arr = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    arr[..., 0] = 255
    Image.fromarray(arr).save(rgb)

    t = load_image(grey, 8, 1)
    assert t.shape == (1, 8, 8) and t.dtype == torch.float32
    assert torch.allclose(t, torch.ones_like(t))
    t = load_image(grey, 12, 3)
    assert t.shape == (3, 12, 12)
    t = load_image(rgb, 8, 3)
    assert t.shape == (3, 8, 8)
    assert torch.allclose(t[0], torch.ones(8, 8)) and float(t[1:].abs().max()) == 0.0
    t = load_image(rgb, 8, 1)  # colour to grey
    assert t.shape == (1, 8, 8)
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0


def test_load_image_16bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((SIZE, SIZE), 65535 // 2, dtype=np.uint16)).save(path)
    t = load_image(path, 8, 1)
    assert t.shape == (1, 8, 8)
    assert torch.allclose(t, torch.full_like(t, 0.5), atol=1e-3)


def test_load_mask_binary_and_resized(tmp_path: Path) -> None:
    image = _write(tmp_path / "i.png")
    arr = np.zeros((SIZE, SIZE), dtype=np.uint8)
    arr[:8] = 200
    arr[8:10] = 100  # below the threshold: not defect
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png", image, 8)
    assert m.shape == (1, 8, 8) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert float(m.mean()) == pytest.approx(0.5)


def test_infer_channels(tmp_path: Path) -> None:
    grey = [Sample(_write(tmp_path / f"g{i}.png", 50 * i), 0, "good", None) for i in range(3)]
    grey_rgb = Sample(_write(tmp_path / "gr.png", 90, mode="RGB"), 0, "good", None)
    arr = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    arr[..., 2] = 30
    Image.fromarray(arr).save(tmp_path / "c.png")
    colour = Sample(tmp_path / "c.png", 0, "good", None)
    assert infer_channels(grey) == 1
    assert infer_channels([*grey, grey_rgb]) == 1
    assert infer_channels([*grey, colour]) == 3
    # Only the first 16 are looked at.
    assert infer_channels([*(grey * 6), colour]) == 1
    with pytest.raises(DataError):
        infer_channels([])


def test_dataset_getitem(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stream, "FEW_IMAGES", 0)  # worker processes even for five images
    cat = _category(tmp_path)
    test = list_split(cat, "test")
    ds = ImageDataset(test, 8, 3, masks=True)
    assert len(ds) == 5
    item = ds[0]
    assert item.index == 0 and item.error is None
    assert item.image.shape == (3, 8, 8) and item.image.dtype == torch.uint8 and item.mask.shape == (8, 8)
    assert float(item.mask.sum()) > 0
    good = ds[2]
    assert test[2].label == 0 and float(good.mask.sum()) == 0
    for workers in (0, 2):  # the same batches, in order, from worker processes
        batches = list(loader(ds, 2, workers))
        assert [b.index for b in batches] == [[0, 1], [2, 3], [4]]
        x = torch.cat([b.stack() for b in batches])
        assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
        assert torch.equal(x, torch.stack([load_image(s.path, 8, 3) for s in test]))
    validate_images(test)
