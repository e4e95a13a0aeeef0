"""Small demo data for tests that train a few steps."""

from __future__ import annotations

from pathlib import Path

from cavga.data import make_demo_data

TINY_SIZE = 32


def small_demo(folder: Path, seed: int = 0, category: str = "brick") -> Path:
    """One demo category at 32 px for tests that train a few steps: 12 training images, 5 normal and
    2 anomalous test images per defect type."""
    return make_demo_data(
        folder, seed=seed, image_size=TINY_SIZE, n_train=12, n_test_good=5, n_test_defect=2,
        categories=(category,),
    )  # fmt: skip
