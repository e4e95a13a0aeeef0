"""Datasets stored in the MVTec AD folder layout.

Layout of one category folder::

    <category>/train/good/*.png                      normal training images
    <category>/test/good/*.png                       normal test images
    <category>/test/<defect_type>/*.png              anomalous test images
    <category>/ground_truth/<defect_type>/<stem>_mask.png   optional masks (or <stem>.png)

Every problem with the folders or files is raised as :class:`~cavga.errors.DataError`
with a message that names the offending path, so the command line can print it as is.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cavga.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_TYPE = "good"
LAYOUT_HINT = (
    "expected the MVTec AD layout: <category>/train/good/*.png, "
    "<category>/test/<defect_type>/*.png (normal test images in test/good) and optionally "
    "<category>/ground_truth/<defect_type>/<name>_mask.png"
)

# Modes that carry no colour; "I"/"I;16*"/"F" are high bit-depth greyscale.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_INFER_CHANNELS_MAX = 16
# PIL signals a bad file with several unrelated exception types; all mean "cannot decode".
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Largest channel difference (of 255) that still counts as grey: a grey picture saved as a colour
# JPEG (or CMYK) comes back with channels a count or two apart.
GREY_TOLERANCE = 2
# EXIF orientations that swap width and height (rotations by 90° and 270°, with or without a flip).
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split.

    Attributes:
        path: Image file.
        label: 0 for normal, 1 for anomalous.
        defect_type: Name of the test subfolder; ``"good"`` for normal images.
        mask_path: Ground-truth mask, or None for normal images and datasets without masks.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


# --------------------------------------------------------------------------- folders


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    files = (
        p for p in folder.iterdir() if _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    return sorted(files, key=lambda p: p.name)


def _no_images(folder: Path) -> DataError:
    return DataError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _plain_image_folder(folder: Path) -> list[Path]:
    """The images of a plain folder of good images (neither train/ nor test/, images of its own),
    which cavga reads as a category's training split; empty for anything else."""
    return [] if _is_category(folder) else _image_files(folder)


def list_categories(root: str | Path) -> list[str]:
    """List the categories of a dataset root.

    Args:
        root: A dataset root holding category folders, or one category folder itself.

    Returns:
        ``[""]`` if ``root`` is itself a category (or a plain folder of images, which is read as
        a category's training images; see :func:`list_split`), else the sorted category names.

    Raises:
        DataError: If ``root`` is missing or holds no category.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder does not exist: {root}")
    if _is_category(root):
        return [""]
    names = [d.name for d in _subdirs(root) if _is_category(d)]
    if not names and _plain_image_folder(root):
        return [""]  # a folder of good images as it came off the line: its own training split
    if not names:
        raise DataError(
            f"no dataset found in {root}: neither it nor any of its subfolders has a train/ "
            f"or test/ folder; {LAYOUT_HINT}"
        )
    return names


def category_dir(root: str | Path, category: str | None) -> Path:
    """Resolve the folder of one category.

    Args:
        root: Dataset root or a category folder.
        category: Category name; None or ``""`` picks ``root`` itself or its only category.

    Returns:
        The category folder.

    Raises:
        DataError: If the category is missing or ambiguous; the message lists the choices.
    """
    root = Path(root)
    names = list_categories(root)
    if names == [""]:
        # Pointing at mvtec/bottle with --category bottle is redundant, not wrong.
        if category and category != root.resolve().name:
            raise DataError(
                f"{root} is itself a category folder (it has train/ or test/, or images of its own), so "
                f"--category {category!r} does not apply; drop --category or point at its parent"
            )
        return root
    if not category:
        if len(names) == 1:
            return root / names[0]
        raise DataError(f"{root} holds several categories ({', '.join(names)}); choose one with --category")
    if category not in names:
        raise DataError(f"category {category!r} not found in {root}; available: {', '.join(names)}")
    return root / category


def _match_masks(images: list[Path], gt_dir: Path) -> dict[Path, Path]:
    """Pair every image with its mask in ``gt_dir`` by file stem (never by position)."""
    by_stem: dict[str, Path] = {}
    for img in images:
        if img.stem in by_stem:
            raise DataError(
                f"two images share the name {img.stem!r}: {by_stem[img.stem]} and {img}; "
                "masks are matched by name, so names must be unique"
            )
        by_stem[img.stem] = img
    pairs: dict[Path, Path] = {}
    masks = _image_files(gt_dir) if gt_dir.is_dir() else []
    for mask in masks:
        stem = mask.stem
        if stem.endswith("_mask") and stem[: -len("_mask")] in by_stem:
            key = stem[: -len("_mask")]
        elif stem in by_stem:
            key = stem
        else:
            want = stem.removesuffix("_mask")
            raise DataError(f"mask {mask} has no matching image: expected {images[0].parent}/{want}.<ext>")
        img = by_stem[key]
        if img in pairs:
            raise DataError(f"image {img} has two masks: {pairs[img]} and {mask}")
        pairs[img] = mask
    for img in images:
        if img not in pairs:
            raise DataError(
                f"anomalous image {img} has no mask: looked for {gt_dir}/{img.stem}_mask.<ext> "
                f"and {gt_dir}/{img.stem}.<ext> (remove {gt_dir.parent} to run without "
                "pixel-level ground truth)"
            )
    return pairs


def _list_train(split_dir: Path) -> list[Sample]:
    for sub in _subdirs(split_dir):
        if sub.name != NORMAL_TYPE:
            raise DataError(
                f"unexpected folder {sub}: training must use normal images only, in {split_dir / NORMAL_TYPE}"
            )
    if _image_files(split_dir):
        raise DataError(
            f"images found directly in {split_dir}; put training images in {split_dir / NORMAL_TYPE}"
        )
    good = split_dir / NORMAL_TYPE
    if not good.is_dir():
        raise DataError(f"missing folder: {good} ({LAYOUT_HINT})")
    files = _image_files(good)
    if not files:
        raise _no_images(good)
    return [Sample(p, 0, NORMAL_TYPE, None) for p in files]


def _list_test(cat_dir: Path, split_dir: Path) -> list[Sample]:
    if _image_files(split_dir):
        raise DataError(
            f"images found directly in {split_dir}; put them in {split_dir}/<defect_type> "
            f"({split_dir / NORMAL_TYPE} for normal images)"
        )
    types = _subdirs(split_dir)
    if not types:
        raise _no_images(split_dir)
    gt_root = cat_dir / "ground_truth"
    use_masks = gt_root.is_dir()
    if use_masks:
        # Mask folders for defect types that have no test images would silently be ignored.
        names = {t.name for t in types}
        for gt_type in _subdirs(gt_root):
            if gt_type.name != NORMAL_TYPE and gt_type.name not in names:
                orphans = _image_files(gt_type)
                if orphans:
                    raise DataError(
                        f"mask {orphans[0]} has no matching image: {split_dir / gt_type.name} does not exist"
                    )
    samples: list[Sample] = []
    for type_dir in types:
        files = _image_files(type_dir)
        if not files:
            raise _no_images(type_dir)
        if type_dir.name == NORMAL_TYPE:
            samples += [Sample(p, 0, NORMAL_TYPE, None) for p in files]
        elif use_masks:
            pairs = _match_masks(files, gt_root / type_dir.name)
            samples += [Sample(p, 1, type_dir.name, pairs[p]) for p in files]
        else:
            samples += [Sample(p, 1, type_dir.name, None) for p in files]
    return samples


def list_split(cat_dir: Path, split: str) -> list[Sample]:
    """List the samples of one split of a category.

    Args:
        cat_dir: Category folder (see :func:`category_dir`).
        split: ``"train"`` (normal images in ``train/good`` only; in a plain folder of images with
            neither ``train/`` nor ``test/``, every image in it) or ``"test"``.

    Returns:
        Samples sorted by defect type, then file name. ``mask_path`` is set for anomalous
        test images when ``ground_truth/`` exists.

    Raises:
        DataError: On a missing or empty folder, an unexpected train subfolder, or an
            anomalous image and its mask that do not pair up by name.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cat_dir = Path(cat_dir)
    split_dir = cat_dir / split
    if split == "train" and (files := _plain_image_folder(cat_dir)):  # all of them train
        return [Sample(p, 0, NORMAL_TYPE, None) for p in files]
    if not split_dir.is_dir():
        raise DataError(f"missing folder: {split_dir} ({LAYOUT_HINT})")
    if split == "train":
        return _list_train(split_dir)
    return _list_test(cat_dir, split_dir)


def has_masks(samples: Sequence[Sample]) -> bool:
    """Return True if any anomalous sample has a ground-truth mask."""
    return any(s.label == 1 and s.mask_path is not None for s in samples)


# --------------------------------------------------------------------------- images


def _unreadable(path: Path, what: str, e: Exception, data: bytes | None = None) -> DataError:
    """The one-line reason a file (or uploaded bytes `data` named `path`) cannot be used."""
    uploaded = data is not None
    if isinstance(e, FileNotFoundError) and not uploaded:
        return DataError(f"file not found: {path}")
    if isinstance(e, PermissionError) and not uploaded:
        return DataError(f"{path} cannot be read: permission denied")
    if isinstance(e, Image.DecompressionBombError):
        return DataError(f"{path} is refused as {what}: {e}")
    if not uploaded and path.is_symlink() and not path.exists():
        return DataError(f"{path} is a broken or looping symbolic link")
    if (uploaded and not data) or (not uploaded and path.is_file() and path.stat().st_size == 0):
        return DataError(f"{path} cannot be decoded as {what}: the file is empty")
    if isinstance(e, UnidentifiedImageError):
        return DataError(
            f"{path} cannot be decoded as {what}: its content is not an image format Pillow reads"
        )
    return DataError(f"{path} cannot be decoded as {what}: {e}")


def open_image(path: Path, what: str = "an image", data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image file (or, with `data`, those bytes, named `path` in messages),
    turned as its EXIF orientation says (as a viewer shows it); DataError naming the file when it
    cannot be read or decoded.

    Pillow refuses images above twice its decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).
    """
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # a copy, so it outlives the closed file
            if im.mode == "P" and "transparency" in im.info:
                # Converting such a palette image to grey or RGB would warn; RGBA is what it means.
                im = im.convert("RGBA")
            return im
    except _DECODE_ERRORS as e:
        raise _unreadable(Path(path), what, e, data) from e


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _resize_float(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of an (H, W) float array via PIL's 'F' mode."""
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))


def image_array(im: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """(channels, size, size) array of a decoded PIL image: uint8 (0–255) for 8-bit images, which
    is what they hold, so a stack of them takes a quarter of the memory; float32 in [0, 1] for
    high bit-depth ones, whose extra precision would be lost in 8 bits. See `to_float`."""
    if im.mode in _HIGH_DEPTH_MODES:
        # convert("L") would clip 16-bit values instead of scaling them, so scale by hand.
        arr = np.asarray(im, dtype=np.float32)
        arr = np.clip(arr, 0.0, 1.0) if im.mode == "F" else np.clip(arr / 65535.0, 0.0, 1.0)
        grey = np.clip(_resize_float(arr, image_size), 0.0, 1.0)
        return np.ascontiguousarray(np.repeat(grey[None], channels, axis=0), dtype=np.float32)
    im = im.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR))
    # Pillow's arrays are read-only; torch wants to own a writable copy.
    return np.require(arr[None] if channels == 1 else arr.transpose(2, 0, 1), requirements=["C", "W"])


def to_float(t: torch.Tensor) -> torch.Tensor:
    """Images from `image_array` (uint8 0–255 or float in [0, 1]) as float32 in [0, 1]."""
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def image_to_tensor(im: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """(channels, size, size) float32 tensor in [0, 1] from a decoded PIL image."""
    return to_float(torch.from_numpy(image_array(im, image_size, channels)))


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """Load an image as a float tensor.

    Args:
        path: Image file.
        image_size: Output height and width.
        channels: 1 (greyscale) or 3 (RGB); colour is converted as needed.

    Returns:
        Tensor of shape (channels, image_size, image_size), float32 in [0, 1].

    Raises:
        DataError: If the file is missing or cannot be decoded.
    """
    _check_channels(channels)
    return image_to_tensor(open_image(Path(path)), image_size, channels)


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) as a viewer shows the image (EXIF orientation applied), from the file
    header only, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
            return w, h
    except _DECODE_ERRORS as e:
        raise _unreadable(Path(path), "an image", e) from e


def _mask_array(im: Image.Image) -> np.ndarray:
    """Binary (H, W) array. The rule: a pixel is defect when its grey value is above half the
    scale (> 127 of 255, > 32767 of 65535), so the noise of a compressed mask (values 1–254 near 0
    or 255) falls to the nearer side; a mask whose largest value is 1 holds 0/1 labels, and 1 is
    defect."""
    if im.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(im, dtype=np.float32)
        high = 0.5 if im.mode == "F" else 32767.5
    else:
        arr = np.asarray(im.convert("L"))
        high = 127
    if arr.size and arr.max() == 1:
        # A mask stored as 0/1 labels would otherwise read as empty, silently losing defects.
        return arr >= 1
    return arr > high


def load_mask(mask_path: Path, image_path: Path, image_size: int) -> torch.Tensor:
    """Load a ground-truth mask.

    Args:
        mask_path: Mask file (white = defect).
        image_path: The image it belongs to; its original size must match the mask's.
        image_size: Output height and width.

    Returns:
        Tensor of shape (1, image_size, image_size), float32 with values in {0, 1}.

    Raises:
        DataError: If the mask cannot be decoded or its size differs from the image's.
    """
    mask_path, image_path = Path(mask_path), Path(image_path)
    im = open_image(mask_path, "a mask image")
    img_size = _header_size(image_path)
    if im.size != img_size:
        raise DataError(
            f"mask {mask_path} is {im.size[0]}x{im.size[1]} but image {image_path} is "
            f"{img_size[0]}x{img_size[1]}; a mask must have the same size as its image"
        )
    binary = Image.fromarray(_mask_array(im).astype(np.uint8) * 255)
    binary = binary.resize((image_size, image_size), Image.Resampling.NEAREST)
    arr = (np.asarray(binary) > 127).astype(np.float32)
    return torch.from_numpy(arr)[None]


def is_grey(im: Image.Image) -> bool:
    """True for grey modes, and for colour images whose channels differ by at most
    `GREY_TOLERANCE` of 255 anywhere (a grey picture stored as colour)."""
    if im.mode in _GREY_MODES:
        return True
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    if im.mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(im)[..., :3].astype(np.int16)
        return int((arr.max(-1) - arr.min(-1)).max(initial=0)) <= GREY_TOLERANCE
    return False


def infer_channels(samples: Sequence[Sample]) -> int:
    """Guess the number of channels a dataset needs from its first images.

    Args:
        samples: Samples of a split; the first 16 that can be decoded are looked at (files that
            cannot be decoded are skipped here and reported where the images are loaded).

    Returns:
        1 if those images are all greyscale (grey modes, or colour with equal channels), else 3.

    Raises:
        DataError: If ``samples`` is empty.
    """
    if not samples:
        raise DataError("cannot infer the number of channels: no images")
    seen = 0
    for s in samples:
        try:
            im = open_image(s.path)
        except DataError:
            continue
        if not is_grey(im):
            return 3
        seen += 1
        if seen == _INFER_CHANNELS_MAX:
            break
    return 1


def validate_images(samples: Sequence[Sample]) -> None:
    """Decode every image and mask once, so a bad file fails now rather than mid-training.

    Also checks that each mask has the size of its image.

    Raises:
        DataError: Naming the first file that is missing, undecodable or mis-sized.
    """
    for s in samples:
        im = open_image(s.path)
        if s.mask_path is not None:
            mask = open_image(s.mask_path, "a mask image")
            if mask.size != im.size:
                raise DataError(
                    f"mask {s.mask_path} is {mask.size[0]}x{mask.size[1]} but image {s.path} "
                    f"is {im.size[0]}x{im.size[1]}; a mask must have the same size as its image"
                )
