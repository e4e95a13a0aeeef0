"""Images read as they are needed: decoded and resized in `DataLoader` worker processes, kept in
memory only while they fit a budget, and optionally cached on disk so a second run does not decode
again.

- `ImageDataset` decodes one sample (image, and its mask or the decoded original when asked); an
  image that cannot be used comes back as an error string naming the file, never as an exception, so
  one bad file costs only itself, whichever process decoded it.
- `scan` decodes every sample once: the usable ones, the skipped ones with their reasons, and the
  resized images themselves while they fit `IN_MEMORY_BYTES` (a few hundred images of 128 px take a
  few MB, so small folders are decoded once; 3,000 colour images of 256 px do not fit and are read
  again by the workers at every use, with memory bounded whatever their number).
- `ImageSource` gives float batches from either, in order (`batches`) or by lists of indices (`take`,
  the training batches).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cavga.data.folder import Sample, image_array, is_grey, load_mask, open_image, to_float
from cavga.errors import DataError, reason, warn

# Resized images kept in memory at most, in bytes (uint8 images take one byte per value).
IN_MEMORY_BYTES = 256 << 20
# Below this many images a loader decodes in its own process (see `loader`).
FEW_IMAGES = 64
# Version of the disk cache's file format; part of every key, so a change never reads stale files.
CACHE_VERSION = 1


def default_workers() -> int:
    """Decoding processes: one core is left to the model, and more than 4 rarely pays."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


class DiskCache:
    """Resized images as `.npy` files in one folder, keyed by the file's resolved path, size and
    modification time and the image size and channels asked for: a changed file, or another size, is
    decoded again. A damaged cache file is decoded again too, never trusted."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, path: Path, what: str, image_size: int, channels: int) -> Path:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{what}|{image_size}|{channels}|{CACHE_VERSION}"
        return self.folder / f"{hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()}.npy"

    def get(self, path: Path, what: str, image_size: int, channels: int) -> np.ndarray | None:
        try:
            return np.load(self._path(path, what, image_size, channels), allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, path: Path, what: str, image_size: int, channels: int, arr: np.ndarray) -> None:
        target = self._path(path, what, image_size, channels)
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                np.save(f, arr, allow_pickle=False)
            tmp.replace(target)  # atomic: a reader never sees half a file
        except OSError:
            tmp.unlink(missing_ok=True)  # a full or read-only cache costs speed, not the run


@dataclass
class Item:
    """One decoded sample: its index, the resized image (C, H, W; uint8 or float, see
    `image_array`), the mask (H, W) when asked, the decoded original when asked, or the error."""

    index: int
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    original: Image.Image | None = None
    error: str | None = None


@dataclass
class Batch:
    """The usable items of a batch, in order, and the indices and reasons of those that failed."""

    index: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    originals: list[Image.Image] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)

    def stack(self) -> torch.Tensor:
        """The usable images as one float32 batch in [0, 1]."""
        return torch.stack([to_float(t) for t in self.images])


def collate(items: list[Item]) -> Batch:
    """`DataLoader`'s collate function for `ImageDataset`."""
    batch = Batch()
    for it in items:
        if it.error is not None:
            batch.failed.append((it.index, it.error))
            continue
        batch.index.append(it.index)
        batch.images.append(it.image)
        if it.mask is not None:
            batch.masks.append(it.mask)
        if it.original is not None:
            batch.originals.append(it.original)
    return batch


class ImageDataset(Dataset):
    """Samples decoded and resized on demand (see the module docstring).

    Args:
        samples: The images.
        image_size: Output height and width.
        channels: 1 or 3.
        masks: Also load each sample's mask (zeros where it has none).
        originals: Also return the decoded image at its own size (`cavga predict` draws on it).
        grey_only: Refuse colour images (a grey run would silently drop their colour).
        cache: Folder of a `DiskCache`, or None.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        channels: int,
        masks: bool = False,
        originals: bool = False,
        grey_only: bool = False,
        cache: str | Path | None = None,
    ):
        self.samples = list(samples)
        self.image_size, self.channels = image_size, channels
        self.masks, self.originals, self.grey_only = masks, originals, grey_only
        self.cache = DiskCache(cache) if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def with_samples(self, samples: Sequence[Sample]) -> ImageDataset:
        """The same settings (size, channels, cache, …) over other samples."""
        other = copy.copy(self)
        other.samples = list(samples)
        return other

    def _image(self, path: Path) -> tuple[np.ndarray, Image.Image | None]:
        arr = None if self.cache is None else self.cache.get(path, "image", self.image_size, self.channels)
        if arr is not None and not self.originals and not self.grey_only:
            return arr, None
        im = open_image(path)
        if self.grey_only and not is_grey(im):
            raise DataError(f"{path}: a colour image, but the run was trained on greyscale images")
        if arr is None:
            arr = image_array(im, self.image_size, self.channels)
            if self.cache is not None:
                self.cache.put(path, "image", self.image_size, self.channels, arr)
        return arr, im if self.originals else None

    def __getitem__(self, i: int) -> Item:
        s = self.samples[i]
        try:
            arr, original = self._image(s.path)
            mask = None
            if self.masks:
                mask = (
                    load_mask(s.mask_path, s.path, self.image_size)[0]
                    if s.mask_path is not None
                    else torch.zeros(self.image_size, self.image_size)
                )
            return Item(i, torch.from_numpy(arr), mask, original)
        except Exception as e:  # in a worker too: one file's problem, whatever it is, is that file's
            return Item(i, error=reason(e))


def loader(
    dataset: ImageDataset,
    batch_size: int = 16,
    workers: int = 0,
    batch_sampler: Iterable[list[int]] | None = None,
) -> DataLoader:
    """A `DataLoader` over `dataset` yielding `Batch`es, in order (or in `batch_sampler`'s). Fewer than
    `FEW_IMAGES` images are decoded in this process: starting workers would cost more than it saves."""
    workers = workers if len(dataset) >= FEW_IMAGES else 0
    kwargs: dict = {"num_workers": workers, "collate_fn": collate}
    if workers > 0:
        kwargs["prefetch_factor"] = 2  # batches in flight per worker: bounds the memory they take
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


class ImageSource:
    """The images of a list of usable samples, held in memory or decoded on demand by workers."""

    def __init__(
        self,
        dataset: ImageDataset,
        images: list[torch.Tensor] | None = None,
        workers: int = 0,
    ):
        self.dataset, self.images, self.workers = dataset, images, workers

    @property
    def samples(self) -> list[Sample]:
        return self.dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, indices: Sequence[int]) -> ImageSource:
        """The images at `indices`, in that order."""
        sub = self.dataset.with_samples([self.samples[i] for i in indices])
        images = None if self.images is None else [self.images[i] for i in indices]
        return ImageSource(sub, images, self.workers)

    def __add__(self, other: ImageSource) -> ImageSource:
        both = self.images is not None and other.images is not None
        images = self.images + other.images if both else None
        return ImageSource(self.dataset.with_samples(self.samples + other.samples), images, self.workers)

    def take(self, index_lists: Iterable[list[int]]) -> Iterator[torch.Tensor]:
        """One float batch per list of indices, in the lists' order."""
        if self.images is not None:
            for idx in index_lists:
                yield torch.stack([to_float(self.images[i]) for i in idx])
            return
        for batch in loader(self.dataset, workers=self.workers, batch_sampler=index_lists):
            if batch.failed:
                # It was readable when the run started; it changed or vanished since.
                raise DataError(batch.failed[0][1])
            yield batch.stack()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive float batches of at most `batch_size` images, in order."""
        n = len(self)
        return self.take([list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


def scan(
    samples: Sequence[Sample],
    image_size: int,
    channels: int,
    workers: int = 0,
    cache: str | Path | None = None,
    budget: int = IN_MEMORY_BYTES,
) -> tuple[ImageSource, list[dict[str, str]]]:
    """Decode every sample once (in `workers` processes): the usable ones as an `ImageSource` (in
    memory while they fit `budget` bytes) and the skipped ones as [{file, error}], each reported on
    stderr with one line naming the file.

    Raises:
        DataError: If no image at all can be used.
    """
    dataset = ImageDataset(samples, image_size, channels, cache=cache)
    kept: list[int] = []
    images: list[torch.Tensor] | None = []
    used = 0
    skipped: list[dict[str, str]] = []
    for batch in loader(dataset, 16, workers):
        for i, error in batch.failed:
            skipped.append({"file": str(dataset.samples[i].path), "error": error})
            warn(f"skipped {dataset.samples[i].path}: {error}")
        kept += batch.index
        if images is not None:
            used += sum(t.numel() * t.element_size() for t in batch.images)
            images.extend(batch.images)
            if used > budget:
                images = None  # too many to hold: the workers decode them again at every use
    if not kept:
        where = samples[0].path.parent if samples else "the split"
        raise DataError(f"{where}: none of the {len(samples)} images can be used (see the lines above)")
    usable = dataset.with_samples([dataset.samples[i] for i in kept])
    return ImageSource(usable, images, workers), skipped
