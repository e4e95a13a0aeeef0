"""cavga: attention-guided anomaly localisation in images (CAVGA, ECCV 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Prediction", "Predictor", "__version__", "load_run"]

if TYPE_CHECKING:
    from cavga.api import Prediction, Predictor, load_run


def __getattr__(name: str) -> Any:
    # The API is imported on first use, not with the package: it brings scikit-learn (about 100 MB
    # resident) into every `cavga train`, which never needs it.
    if name in __all__:
        from cavga import api

        return getattr(api, name)
    raise AttributeError(f"module 'cavga' has no attribute {name!r}")
