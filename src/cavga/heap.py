"""Giving the pages that glibc's heap keeps after PyTorch frees its buffers back to the system.

PyTorch's CPU tensors come from `malloc`. glibc serves a large request with its own `mmap` (returned
on `free`) only above a threshold that it raises, by default, each time such a block is freed, up to
32 MB. After a few training steps every activation buffer therefore lives in the heap, and the small
tensors that fitting the normal states keeps for the whole pass (a few candidate features, one
whole-image embedding per image) land between them: the heap cannot shrink past them, and resident
memory grows with the number of images, although most of the heap is free. `malloc_trim` hands those
free pages back. (A fixed low threshold, `MALLOC_MMAP_THRESHOLD_=65536`, bounds memory during
training too but slowed training by 35–40 % on a 2-core AMD EPYC; README, the scale section.)
Elsewhere than Linux with glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # musl and others have no malloc_trim


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (after every training step, and every few
    batches of every calibration pass)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def trimming(items: Iterable[T], every: int) -> Iterator[T]:
    """`items`, giving the heap's free pages back after every `every` of them: a pass over many
    batches otherwise spreads its short-lived buffers over ever more of a fragmented heap's free
    pages, each left resident once touched."""
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0:
            release_free_memory()
