"""Evaluation metrics for anomaly detection (image level) and localisation (pixel level).

All functions take numpy arrays: anomaly maps ``(N, H, W)`` of floats (higher means more
anomalous), ground-truth masks ``(N, H, W)`` with values in {0, 1} (anything > 0.5 counts as
anomalous), image scores ``(N,)`` and image labels ``(N,)`` with 0 = normal, 1 = anomalous.

Metrics that are undefined for the given data (for example an AUROC when only one class is
present) return ``float("nan")`` rather than raising, so that a whole evaluation can still be
reported; :func:`summarize` turns those NaNs into ``None`` for JSON.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from skimage.measure import label as label_components
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

__all__ = [
    "aupro",
    "detection_accuracy",
    "f1_max",
    "image_auroc",
    "minmax_normalise",
    "normal_threshold",
    "paper_detection_accuracy",
    "pixel_auroc",
    "pixel_iou",
    "pro_curve",
    "summarize",
    "summarize_maps",
]

NAN = float("nan")


def _maps_and_masks(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring maps and masks to ``(N, H, W)`` float / bool arrays and check they match."""
    maps = np.asarray(maps)
    if maps.dtype.kind != "f":
        maps = maps.astype(np.float64)  # float maps keep their precision (and memory)
    masks = np.asarray(masks)
    # A single image may be passed as (H, W); treat it as a batch of one.
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps and masks must both have shape (N, H, W); got {maps.shape} and {masks.shape}")
    # Masks may arrive as bool, uint8 {0, 1} or float {0., 1.}; > 0.5 covers all of them.
    return maps, masks > 0.5


def _scores_and_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten scores and labels to 1-D float / bool arrays of equal length."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same size; got {scores.size} and {labels.size}")
    return scores, labels > 0.5


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    # roc_auc_score raises on a single class; NaN lets a report carry on.
    if positive.all() or not positive.any():
        return NAN
    return float(roc_auc_score(positive, scores))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images.

    Args:
        maps: Anomaly maps ``(N, H, W)``.
        masks: Ground-truth masks ``(N, H, W)`` in {0, 1}.

    Returns:
        The pixel AUROC, or NaN when the masks contain only one class.
    """
    maps, masks = _maps_and_masks(maps, masks)
    return _auroc(maps.ravel(), masks.ravel())


def pixel_iou(
    maps: np.ndarray,
    masks: np.ndarray,
    threshold: float = 0.5,
    anomalous_only: bool = True,
) -> float:
    """Mean per-image intersection over union of ``map >= threshold`` with the mask.

    Convention: IoU is computed for each image separately and then averaged (so a small defect
    weighs as much as a large one). With ``anomalous_only`` the mean runs over images whose mask
    has at least one positive pixel (the usual localisation IoU, as in the CAVGA paper);
    otherwise over all images, where an image with an empty mask and an empty prediction scores
    1 (nothing to find, nothing found) and one with an empty mask but a non-empty prediction 0.

    Args:
        maps: Anomaly maps ``(N, H, W)``.
        masks: Ground-truth masks ``(N, H, W)`` in {0, 1}.
        threshold: Map value at or above which a pixel is predicted anomalous.
        anomalous_only: Average over anomalous images only (True) or over all images.

    Returns:
        The mean IoU, or NaN when no image is averaged over.
    """
    maps, masks = _maps_and_masks(maps, masks)
    pred = maps >= threshold
    inter = np.logical_and(pred, masks).sum(axis=(1, 2))
    union = np.logical_or(pred, masks).sum(axis=(1, 2))
    # union == 0 means both empty: a correct "nothing here", hence IoU 1.
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    if anomalous_only:
        iou = iou[masks.any(axis=(1, 2))]
    return float(iou.mean()) if iou.size else NAN


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of image anomaly scores.

    Args:
        scores: Image scores ``(N,)``, higher means more anomalous.
        labels: Image labels ``(N,)``, 0 normal, 1 anomalous.

    Returns:
        The image AUROC, or NaN when only one class is present.
    """
    scores, labels = _scores_and_labels(scores, labels)
    return _auroc(scores, labels)


def detection_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Balanced detection accuracy at a fixed threshold.

    An image is called anomalous when ``score >= threshold``. The result is the mean of the
    accuracy on normal images and the accuracy on anomalous images, so it is not dominated by
    whichever class has more test images. When one class is absent, only the other counts.

    Args:
        scores: Image scores ``(N,)``.
        labels: Image labels ``(N,)``, 0 normal, 1 anomalous.
        threshold: Score at or above which an image is called anomalous.

    Returns:
        The balanced accuracy in [0, 1], or NaN for an empty input.
    """
    scores, labels = _scores_and_labels(scores, labels)
    called = scores >= threshold
    per_class = [
        float(np.mean(called[labels] if positive else ~called[~labels]))
        for positive in (False, True)
        if (labels if positive else ~labels).any()
    ]
    return float(np.mean(per_class)) if per_class else NAN


def minmax_normalise(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise scores over the evaluated set to [0, 1].

    This is the paper protocol for detection accuracy: the scores of the evaluated images are
    rescaled together and then thresholded at 0.5. Constant scores map to zeros.

    Args:
        scores: Scores of any shape.

    Returns:
        A float array of the same shape in [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores.copy()
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        return np.zeros_like(scores)
    return (scores - lo) / (hi - lo)


def paper_detection_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Balanced detection accuracy with the paper protocol (min-max normalise, threshold 0.5).

    Args:
        scores: Raw image scores ``(N,)``.
        labels: Image labels ``(N,)``, 0 normal, 1 anomalous.

    Returns:
        :func:`detection_accuracy` of the normalised scores at 0.5.
    """
    return detection_accuracy(minmax_normalise(scores), labels, 0.5)


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region-overlap curve (Bergmann et al., MVTec AD).

    For each threshold ``t`` (pixels with ``map >= t`` are predicted anomalous), PRO is the mean
    over all connected ground-truth regions (8-connectivity, over all images) of the fraction of
    the region's pixels that are predicted, and FPR is the fraction of normal pixels (over all
    images) that are predicted. Thresholds are evenly spaced over the map range and returned in
    decreasing order, preceded by ``+inf`` (nothing predicted), so both FPR and PRO are
    non-decreasing along the curve, which starts at (0, 0) and ends at (1, 1).

    Args:
        maps: Anomaly maps ``(N, H, W)``.
        masks: Ground-truth masks ``(N, H, W)`` in {0, 1}.
        num_thresholds: Number of evenly spaced thresholds over ``[map.min(), map.max()]``.

    Returns:
        ``(fpr, pro, thresholds)``, each of length ``num_thresholds + 1``.

    Raises:
        ValueError: If there is no anomalous or no normal pixel (the curve is undefined).
    """
    maps, masks = _maps_and_masks(maps, masks)
    if not masks.any() or masks.all():
        raise ValueError("a PRO curve needs both anomalous and normal pixels")
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be >= 1; got {num_thresholds}")

    # Give every connected region a global id (1..R); 0 stays background.
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i in np.flatnonzero(masks.any(axis=(1, 2))):
        lab, n = label_components(masks[i], connectivity=2, return_num=True)
        regions[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n

    ascending = np.linspace(maps.min(), maps.max(), num_thresholds)

    # Normal pixels predicted at threshold t are those with value >= t: with k = the number of
    # thresholds <= each value (as for the anomalous pixels below), counted without sorting.
    normal = maps[~masks]
    k_normal = np.bincount(np.searchsorted(ascending, normal, side="right"), minlength=num_thresholds + 1)
    fpr_asc = np.cumsum(k_normal[::-1])[::-1][1:] / normal.size

    # For each anomalous pixel, k = number of thresholds <= value, so the pixel is predicted at
    # exactly the thresholds ascending[:k]. A (region, k) histogram then a reversed cumulative
    # sum gives, per region and threshold, how many of its pixels are predicted.
    pos_values = maps[masks]
    pos_regions = regions[masks] - 1
    k = np.searchsorted(ascending, pos_values, side="right")
    hist = np.bincount(
        pos_regions * (num_thresholds + 1) + k, minlength=n_regions * (num_thresholds + 1)
    ).reshape(n_regions, num_thresholds + 1)
    # predicted[:, j] = pixels with k > j, i.e. value >= ascending[j].
    predicted = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = hist.sum(axis=1, keepdims=True)
    pro_asc = (predicted / sizes).mean(axis=0)

    fpr = np.concatenate([[0.0], fpr_asc[::-1]])
    pro = np.concatenate([[0.0], pro_asc[::-1]])
    thresholds = np.concatenate([[np.inf], ascending[::-1]])
    return fpr, pro, thresholds


def aupro(
    maps: np.ndarray,
    masks: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """Normalised area under the PRO curve up to a false-positive rate limit.

    The PRO curve (see :func:`pro_curve`) is integrated over FPR from 0 to ``fpr_limit`` with
    the trapezoid rule, interpolating linearly at ``fpr_limit``, and divided by ``fpr_limit`` so
    that a perfect map scores 1.0.

    Args:
        maps: Anomaly maps ``(N, H, W)``.
        masks: Ground-truth masks ``(N, H, W)`` in {0, 1}.
        fpr_limit: Upper integration limit on the false-positive rate, in (0, 1].
        num_thresholds: Number of thresholds over the map range.

    Returns:
        The normalised AUPRO in [0, 1], or NaN when there is no anomalous (or no normal) pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    maps, masks = _maps_and_masks(maps, masks)
    if not masks.any() or masks.all():
        return NAN
    fpr, pro, _ = pro_curve(maps, masks, num_thresholds)
    # The last point has FPR 1, so when fpr_limit < 1 there is a point beyond it.
    return _area_to(fpr, pro, fpr_limit)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 score over all thresholds.

    Works for images (scores, labels) and for pixels (flattened maps, flattened masks).

    Args:
        scores: Scores, any shape (flattened).
        labels: Binary labels of the same size.

    Returns:
        The maximum F1, or NaN when there is no positive label.
    """
    scores, labels = _scores_and_labels(scores, labels)
    if not labels.any():
        return NAN
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    # Points with precision == recall == 0 have F1 0, not 0/0.
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return float(f1.max())


def normal_threshold(normal_scores: np.ndarray, false_alarm_rate: float = 0.01) -> float:
    """Threshold chosen from normal data only, for a target false-alarm rate.

    Returns the ``1 - false_alarm_rate`` quantile of the normal scores (or of the normal
    pixels' map values) with numpy's ``"higher"`` method, so the threshold is an observed value
    and at most about ``false_alarm_rate`` of normal data lies strictly above it.

    Args:
        normal_scores: Scores or map values of normal images, any shape.
        false_alarm_rate: Target fraction of normal data flagged, in [0, 1).

    Returns:
        The threshold.
    """
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in [0, 1); got {false_alarm_rate}")
    values = np.asarray(normal_scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("normal_threshold needs at least one normal score")
    return float(np.quantile(values, 1.0 - false_alarm_rate, method="higher"))


def _clean(value: float) -> float | None:
    """Plain Python float for JSON, with NaN (undefined metric) as None."""
    value = float(value)
    return None if math.isnan(value) else value


# Levels of the quantised maps `summarize` computes pixel metrics on (see `PixelLevels`).
LEVELS = 1 << 16
# What one `summarize` of a map with masks holds at its peak, per pixel (13 measured with tracemalloc,
# 18 when some images are left out of the pixel metrics), and what `summarize_maps`' threads may hold
# together: large test sets are summarised one map at a time.
SUMMARY_BYTES_PER_PIXEL = 20
METRICS_MEMORY = 1 << 30


class PixelLevels:
    """The pixels of a test set's maps, quantised once to `LEVELS` evenly spaced levels over the
    maps' range (a monotone map: ties may merge, order never flips), with each block of images'
    histograms of normal and anomalous pixels.

    Every pixel metric of a group of blocks then comes from the summed histograms in time linear in
    the pixels, without sorting: AUROC (ties count half), F1-max and the PRO curve are those of the
    quantised map. They equal the exact figures when the maps have no two values closer than
    1/`LEVELS` of their range that the exact metric would order, and differ from them by at most the
    share of (anomalous, normal) pixel pairs within one level otherwise (under 1e-5 on real maps).
    """

    def __init__(self, maps: np.ndarray, masks: np.ndarray, blocks: np.ndarray, num_thresholds: int = 200):
        self.lo, hi = float(maps.min()), float(maps.max())
        self.scale = (LEVELS - 1) / (hi - self.lo) if hi > self.lo else 0.0
        self.num_thresholds = num_thresholds
        names, block = np.unique(blocks, return_inverse=True)
        # One pass over every pixel: bin (block, level, defect?) for all blocks' histograms at once.
        key = self.level(maps).astype(np.int32)
        key *= 2
        key += masks
        key += (block.astype(np.int32) * 2 * LEVELS)[:, None, None]
        hist = np.bincount(key.ravel(), minlength=len(names) * 2 * LEVELS).reshape(len(names), LEVELS, 2)
        del key
        # The defect pixels: their values, connected regions and blocks (a few % of the pixels).
        defective = np.flatnonzero(masks.any(axis=(1, 2)))
        m = masks[defective]
        values, regions = maps[defective][m], _regions(m)[m]
        pixel_block = np.repeat(block[defective], m.sum(axis=(1, 2)))
        low, high = maps.min(axis=(1, 2)), maps.max(axis=(1, 2))
        self.stats: dict[object, dict] = {}
        for i, name in enumerate(names):
            images = block == i
            mine = pixel_block == i
            self.stats[name] = {
                "pos": hist[i, :, 1],
                "neg": hist[i, :, 0],
                "values": values[mine],
                # Regions numbered 0 … R − 1 within the block.
                "regions": np.unique(regions[mine], return_inverse=True)[1].ravel(),
                "range": (float(low[images].min()), float(high[images].max())),
            }

    def level(self, values: np.ndarray) -> np.ndarray:
        """The level of each value (clipped to the quantised range)."""
        values = np.asarray(values)
        scaled = values - values.dtype.type(self.lo)  # in the maps' own precision: monotone, and fast
        scaled *= values.dtype.type(self.scale)
        np.clip(scaled, 0, LEVELS - 1, out=scaled)
        return scaled

    def metrics(self, blocks: Sequence) -> dict[str, float]:
        """pixel_auroc, aupro and pixel_f1_max of the images of `blocks` together (NaN if undefined)."""
        pos = sum(self.stats[b]["pos"] for b in blocks)
        neg = sum(self.stats[b]["neg"] for b in blocks)
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        if n_pos == 0 or n_neg == 0:
            return {"pixel_auroc": NAN, "aupro": NAN, "pixel_f1_max": NAN if n_pos == 0 else 1.0}
        pos, neg = pos.astype(np.float64), neg.astype(np.float64)
        below = np.cumsum(neg) - neg
        auroc = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
        # Predicting "level ≥ l" for every level l at once: counts from the top.
        tp, fp = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]
        f1 = float((2 * tp / (tp + fp + n_pos)).max())
        return {"pixel_auroc": auroc, "aupro": self._aupro(neg, n_neg, blocks), "pixel_f1_max": f1}

    def _aupro(self, neg: np.ndarray, n_neg: int, blocks: Sequence, fpr_limit: float = 0.3) -> float:
        """As `aupro`, with the same thresholds (evenly spaced over the group's values). Each region's
        share above a threshold is exact; the normal pixels above it are counted from the histogram,
        those in the threshold's own level taken as spread evenly over it."""
        low = min(self.stats[b]["range"][0] for b in blocks)
        high = max(self.stats[b]["range"][1] for b in blocks)
        ascending = np.linspace(low, high, self.num_thresholds)
        position = np.clip((ascending - self.lo) * self.scale, 0, LEVELS - 1)
        lvl = position.astype(np.intp)
        above = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])  # normal pixels at level ≥ l
        normal_above = above[lvl + 1] + (1 - (position - lvl)) * neg[lvl]
        fpr = np.concatenate([[0.0], normal_above[::-1] / n_neg])
        # As in `pro_curve`: a (region, k) histogram, k = how many thresholds a pixel reaches.
        t = len(ascending)
        per_region = []
        for p in (self.stats[b] for b in blocks if len(self.stats[b]["values"])):
            k = np.searchsorted(ascending, p["values"], side="right")
            n = int(p["regions"].max()) + 1
            hist = np.bincount(p["regions"] * (t + 1) + k, minlength=n * (t + 1)).reshape(n, t + 1)
            per_region.append(np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:] / hist.sum(1, keepdims=True))
        pro = np.concatenate([[0.0], np.concatenate(per_region).mean(0)[::-1]])
        return _area_to(fpr, pro, fpr_limit)


def _regions(masks: np.ndarray) -> np.ndarray:
    """Connected regions (8-connectivity) of (N, H, W) masks, numbered 1 … R over all images (0:
    background), with one labelling call: the images are stacked with a blank row between them."""
    n, h, w = masks.shape
    canvas = np.zeros((n, h + 1, w), dtype=bool)
    canvas[:, :h] = masks
    return label_components(canvas.reshape(n * (h + 1), w), connectivity=2).reshape(n, h + 1, w)[:, :h]


def _area_to(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Normalised trapezoid area under a non-decreasing curve from FPR 0 to `fpr_limit`, with one
    point interpolated exactly at the limit."""
    n = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:n], pro[:n]
    if n < fpr.size:
        x0, x1, y0, y1 = fpr[n - 1], fpr[n], pro[n - 1], pro[n]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return float(auc(x, y) / fpr_limit)


def summarize(
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    defect_types: Sequence[str],
    map_threshold: float = 0.5,
    image_threshold: float | None = None,
    pixel_valid: np.ndarray | None = None,
) -> dict[str, dict]:
    """All metrics, over the whole test set and per defect type, ready for ``json.dump``.

    Each group reports ``pixel_iou`` (anomalous images only), ``pixel_iou_all`` (all images),
    ``pixel_auroc``, ``aupro``, ``pixel_f1_max``, ``image_auroc``, ``detection_accuracy``,
    ``n_images`` and ``n_anomalous``. A defect type's group is its anomalous images together
    with all normal (label 0) images, so that AUROC and accuracy are defined; normal images get
    no group of their own. Undefined metrics are ``None``, and all pixel metrics are ``None``
    when ``masks`` (or ``maps``) is None. Pixel AUROC, AUPRO and F1-max are those of the maps
    quantised to `LEVELS` levels (see `PixelLevels`: one pass over the pixels, no sorting, so a
    test set of 200 images of 256 px takes well under a second per map).

    Args:
        maps: Anomaly maps ``(N, H, W)``, or None.
        masks: Ground-truth masks ``(N, H, W)``, or None when there is no ground truth.
        scores: Image scores ``(N,)``.
        labels: Image labels ``(N,)``, 0 normal, 1 anomalous.
        defect_types: Defect type name of each image (e.g. ``"good"``, ``"crack"``).
        map_threshold: Map value at or above which a pixel is predicted anomalous (IoU).
        image_threshold: Raw score threshold for detection accuracy; None uses the paper
            protocol (min-max normalise over each evaluated group, threshold 0.5).
        pixel_valid: ``(N,)`` bool, the images whose pixels the pixel metrics use (None: all);
            image metrics always use every image.

    Returns:
        ``{"overall": {...}, "per_type": {type: {...}}}``.
    """
    scores, labels = _scores_and_labels(scores, labels)
    types = np.asarray([str(t) for t in defect_types])
    if types.size != labels.size:
        raise ValueError(f"defect_types has {types.size} entries but there are {labels.size} images")
    has_pixels = maps is not None and masks is not None
    valid = np.ones(labels.size, dtype=bool) if pixel_valid is None else np.asarray(pixel_valid, dtype=bool)
    if has_pixels:
        maps, masks = _maps_and_masks(maps, masks)
        if maps.shape[0] != labels.size:
            raise ValueError(f"{maps.shape[0]} maps but {labels.size} image labels")
        # Every group is all normal images plus one defect type's (or all): blocks of images whose
        # histograms are computed once and summed per group.
        blocks = (
            np.where(labels, types, "") if valid.all() else np.where(valid, np.where(labels, types, ""), None)
        )
        # Boolean indexing copies: skip it when every image counts.
        pick = slice(None) if valid.all() else valid
        levels = PixelLevels(maps[pick], masks[pick], blocks[pick])
        pred = maps >= map_threshold
        inter = np.logical_and(pred, masks).sum(axis=(1, 2))
        union = np.logical_or(pred, masks).sum(axis=(1, 2))
        # union == 0 means both empty: a correct "nothing here", hence IoU 1 (see `pixel_iou`).
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        defective = masks.any(axis=(1, 2))

    def group(select: np.ndarray) -> dict[str, float | int | None]:
        s, lab = scores[select], labels[select]
        accuracy = (
            paper_detection_accuracy(s, lab)
            if image_threshold is None
            else detection_accuracy(s, lab, image_threshold)
        )
        out: dict[str, float | int | None] = {
            "pixel_iou": None,
            "pixel_iou_all": None,
            "pixel_auroc": None,
            "aupro": None,
            "pixel_f1_max": None,
            "image_auroc": _clean(image_auroc(s, lab)),
            "detection_accuracy": _clean(accuracy),
            "n_images": int(lab.size),
            "n_anomalous": int(lab.sum()),
        }
        if has_pixels:
            pix = select & valid
            out.update({k: _clean(v) for k, v in levels.metrics(sorted(set(blocks[pix].tolist()))).items()})
            found = iou[pix & defective]
            out["pixel_iou"] = _clean(found.mean()) if found.size else None
            out["pixel_iou_all"] = _clean(iou[pix].mean()) if pix.any() else None
        return out

    everything = np.ones(labels.size, dtype=bool)
    per_type = {
        # Normal images are identified by label, not by the name "good", so any naming works.
        name: group(~labels | (labels & (types == name)))
        for name in sorted(set(types[labels].tolist()))
    }
    return {"overall": group(everything), "per_type": per_type}


def summarize_maps(
    maps_and_scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    masks: np.ndarray | None,
    labels: np.ndarray,
    defect_types: Sequence[str],
    workers: int | None = None,
    **options,
) -> dict[str, dict[str, dict]]:
    """`summarize` for several maps of one test set, ``{name: (maps, scores)}`` → ``{name: summary}``.

    The maps are summarised in `workers` threads (None: one per map, at most the CPU count, 4, and as
    many as `METRICS_MEMORY` allows): numpy releases the GIL in the per-pixel passes, so on 2 cores
    seven maps take about two thirds of the time of one after another. `options` are passed on to
    `summarize`.
    """
    names = list(maps_and_scores)
    if workers is None:
        pixels = masks.size if masks is not None else 0
        affordable = max(1, METRICS_MEMORY // max(1, SUMMARY_BYTES_PER_PIXEL * pixels))
        workers = min(len(names), os.cpu_count() or 1, 4, affordable)

    def one(name: str) -> dict[str, dict]:
        maps, scores = maps_and_scores[name]
        return summarize(maps, masks, scores, labels, defect_types, **options)

    if workers <= 1 or len(names) <= 1:
        return {name: one(name) for name in names}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))
