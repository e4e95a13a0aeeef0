"""cavga: attention-guided anomaly localisation in images (CAVGA, ECCV 2020)."""

__version__ = "0.1.0"

from cavga.api import Prediction, Predictor, load_run

__all__ = ["Prediction", "Predictor", "__version__", "load_run"]
