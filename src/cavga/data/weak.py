"""The anomalous training images of the weakly supervised setting: image labels only, never masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cavga.data.folder import IMAGE_EXTENSIONS, Sample, _image_files
from cavga.errors import DataError


def weak_split(test_samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """The paper's protocol: a seeded `fraction` (2 %) of the anomalous test images, at least one.

    The chosen images train with their image label only and must leave the test set (the engine
    removes every training image from evaluation). Returned in test-set order.
    """
    anomalous = [s for s in test_samples if s.label == 1]
    if not anomalous:
        folder = test_samples[0].path.parent.parent if test_samples else "the test set"
        raise DataError(
            f"{folder}: a weakly supervised model needs anomalous images, and this test set has none; "
            "give labelled anomalous training images with --anomalous-dir"
        )
    if not 0 < fraction < 1:
        raise DataError(f"the weakly supervised fraction must be in (0, 1), got {fraction}")
    n = max(1, round(fraction * len(anomalous)))
    order = torch.randperm(len(anomalous), generator=torch.Generator().manual_seed(seed)).tolist()
    return [anomalous[i] for i in sorted(order[:n])]


def anomalous_folder(folder: str | Path) -> list[Path]:
    """A user's own labelled anomalous training images: every image file in `folder` and below."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"anomalous training folder not found: {folder}")
    folders = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    files = [f for d in folders for f in _image_files(d)]
    if not files:
        raise DataError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files
