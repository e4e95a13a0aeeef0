"""Anomaly maps: the paper's attention and ours, calibrated on normal images only.

One module per family, each registering its maps in `MAPS` (see `registry`) when imported, in the
order of the tables: `gradcam` (each model's own map, `paper`, and Grad-CAM variants), `statistics`
(`latent-stats`), `memory` (`memory`, `nearest-image` and the whole-image score), `residual`
(`residual`, `fusion`). `calibration` fits the maps' normal states and sets scales and thresholds;
its `MapMaker` computes maps for batches of images. Adding a map is one new module with one
`register_map` call, imported below.
"""

from cavga.maps import gradcam, memory, residual, statistics  # noqa: F401  (registers the maps)
from cavga.maps.calibration import (
    CALIBRATED,
    SCALE_QUANTILE,
    MapMaker,
    calibrate,
    cheap_maps,
    costly,
    run_maps,
)
from cavga.maps.gradcam import GRADCAM_STRIDES, paper_map
from cavga.maps.memory import greedy_coreset, nearest_distance
from cavga.maps.registry import MAPS, MapContext, MapSpec, available_maps, register_map
from cavga.maps.statistics import feature_deviation, fit_feature_stats

__all__ = [
    "CALIBRATED",
    "GRADCAM_STRIDES",
    "MAPS",
    "SCALE_QUANTILE",
    "MapContext",
    "MapMaker",
    "MapSpec",
    "available_maps",
    "calibrate",
    "cheap_maps",
    "costly",
    "feature_deviation",
    "fit_feature_stats",
    "greedy_coreset",
    "nearest_distance",
    "paper_map",
    "register_map",
    "run_maps",
]
