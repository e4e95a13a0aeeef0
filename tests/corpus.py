"""The bad-input corpus: every kind of untidy file a camera, scanner or file share produces.

Used by `tests/test_bad_inputs.py` and by `scripts/bad_inputs.py` (which prints the table of what
each entry point does with each input). Every file is made here from a valid grey image, so the
corpus needs no download and no fixture files.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# What an entry point must do with an input: use it, refuse it with one line naming the file and
# go on with the others, or not see it at all.
HANDLED, REFUSED, IGNORED = "handled", "refused", "ignored"
RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class BadInput:
    """One corpus entry: a description, its file name in the folder and the expected outcome."""

    what: str
    name: str
    expected: str


def _png(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims width × height pixels, above Pillow's decompression-bomb
    limit (2 × 89 M pixels); Pillow refuses it before decoding anything."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0"))
        + _chunk(b"IEND", b"")
    )


def non_utf8_name() -> str:
    """A file name whose bytes are not valid UTF-8 (Latin-1 'café'), as Python sees it on Linux."""
    return os.fsdecode(b"caf\xe9.png")


def make_images(folder: Path, base: np.ndarray) -> list[BadInput]:
    """Write the image part of the corpus into `folder` from `base`, a grey (H, W) uint8 image.

    Returns the entries in table order. The contents are grey even in the colour modes, so a grey
    run accepts them; the EXIF-rotated JPEG is stored on its side (wider than tall) and shows as
    `rotated_view(base)` (taller than wide).
    """
    folder.mkdir(parents=True, exist_ok=True)
    h, w = base.shape
    png, jpg = _png(base), _jpeg(Image.fromarray(base))
    entries: list[tuple[BadInput, bytes | None]] = [
        (BadInput("empty file", "empty.png", REFUSED), b""),
        (BadInput("truncated PNG", "truncated.png", REFUSED), png[: len(png) // 2]),
        (BadInput("truncated JPEG", "truncated.jpg", REFUSED), jpg[: len(jpg) // 2]),
        (BadInput("text file named .png", "text.png", REFUSED), b"this is not an image\n"),
        (BadInput("16-bit PNG", "deep16.png", HANDLED), _png(base.astype(np.uint16) * 257)),
        (BadInput("CMYK JPEG", "cmyk.jpg", HANDLED), _jpeg(Image.fromarray(base).convert("CMYK"))),
        (
            BadInput("palette PNG with transparency", "palette.png", HANDLED),
            _png(np.asarray(Image.fromarray(base).quantize(64)), transparency=0),
        ),
        (
            BadInput("RGBA PNG", "rgba.png", HANDLED),
            _png(np.dstack([base, base, base, np.linspace(0, 255, w, dtype=np.uint8)[None].repeat(h, 0)])),
        ),
        (BadInput("JPEG with EXIF rotation (90°)", "rotated.jpg", HANDLED), None),
        (BadInput("1×1 image", "one_pixel.png", HANDLED), _png(base[:1, :1])),
        (BadInput("above the decompression-bomb limit", "bomb.png", REFUSED), bomb_png()),
        (BadInput("file name not valid UTF-8", non_utf8_name(), HANDLED), png),
        (
            # Permission bits do not bind root, so as root the file is simply read.
            BadInput("no read permission", "locked.png", HANDLED if RUNNING_AS_ROOT else REFUSED),
            png,
        ),
        (BadInput("hidden file .DS_Store", ".DS_Store", IGNORED), b"\0\0\0\1Bud1" + bytes(64)),
        (BadInput("hidden image ._base.png (AppleDouble)", "._base.png", IGNORED), b"\0\5\26\7" + bytes(60)),
        (BadInput("symbolic link loop", "loop.png", IGNORED), None),
    ]
    for entry, data in entries:
        path = folder / entry.name
        if data is not None:
            path.write_bytes(data)
    # Stored 90° off: a viewer (and cavga) turns it back to `rotated_view(base)`.
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    Image.fromarray(np.ascontiguousarray(np.rot90(rotated_view(base), 1))).save(
        folder / "rotated.jpg", exif=exif.tobytes(), quality=95
    )
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "up").symlink_to("..", target_is_directory=True)  # a folder loop for recursive walks
    (folder / "locked.png").chmod(0)
    return [e for e, _ in entries]


def rotated_view(base: np.ndarray) -> np.ndarray:
    """What the EXIF-rotated JPEG shows: the left three quarters of `base`, taller than wide."""
    return base[:, : base.shape[1] * 3 // 4]


def make_masks(gt_folder: Path, test_folder: Path, base: np.ndarray) -> list[BadInput]:
    """Anomalous test images in `test_folder` with untidy masks in `gt_folder`."""
    gt_folder.mkdir(parents=True, exist_ok=True)
    test_folder.mkdir(parents=True, exist_ok=True)
    h, w = base.shape
    rng = np.random.default_rng(0)
    defect = np.zeros((h, w), np.uint8)
    defect[h // 4 : h // 2, w // 4 : w // 2] = 255
    # Compression noise: values 1–254 around 0 and 255 (binarised at half the scale).
    noisy = np.clip(defect.astype(int) + rng.integers(-100, 100, (h, w)), 0, 255).astype(np.uint8)
    entries = [
        (BadInput("mask with values other than 0/255", "noisy_mask", HANDLED), noisy),
        (BadInput("all-zero mask of an anomalous image", "empty_mask", HANDLED), np.zeros((h, w), np.uint8)),
        (BadInput("mask of another size", "wrong_size_mask", REFUSED), defect[: h // 2]),
    ]
    for entry, mask in entries:
        img = base.copy()
        img[h // 4 : h // 2, w // 4 : w // 2] = 255 - img[h // 4 : h // 2, w // 4 : w // 2]
        (test_folder / f"{entry.name}.png").write_bytes(_png(img))
        (gt_folder / f"{entry.name}_mask.png").write_bytes(_png(mask))
    return [e for e, _ in entries]


def noisy_mask_truth(base: np.ndarray) -> np.ndarray:
    """The defect the noisy mask was made from (what binarisation must recover)."""
    h, w = base.shape
    truth = np.zeros((h, w), bool)
    truth[h // 4 : h // 2, w // 4 : w // 2] = True
    return truth
