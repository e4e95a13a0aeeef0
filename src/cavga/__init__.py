"""cavga: attention-guided anomaly localisation in images (CAVGA, ECCV 2020)."""

__version__ = "0.1.0"
