"""Metrics checked against scikit-learn, brute force, or cases worked out by hand."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from skimage.measure import label as label_components
from sklearn.metrics import roc_auc_score

from cavga.metrics import (
    aupro,
    detection_accuracy,
    f1_max,
    image_auroc,
    minmax_normalise,
    normal_threshold,
    paper_detection_accuracy,
    pixel_auroc,
    pixel_iou,
    pro_curve,
    summarize,
    summarize_maps,
)

METRIC_KEYS = {
    "pixel_iou",
    "pixel_iou_all",
    "pixel_auroc",
    "aupro",
    "pixel_f1_max",
    "image_auroc",
    "detection_accuracy",
    "n_images",
    "n_anomalous",
}


def random_case(seed: int = 0, n: int = 6, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Maps loosely correlated with masks that hold a few blobs of different sizes."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n // 2):
        for _ in range(2):
            r, c = rng.integers(0, size - 6, size=2)
            h, w = rng.integers(1, 7, size=2)
            masks[i, r : r + h, c : c + w] = 1
    maps = 0.4 * masks + 0.8 * rng.random(masks.shape)
    return maps, masks


# ---------------------------------------------------------------- AUROC


def test_pixel_auroc_matches_sklearn() -> None:
    maps, masks = random_case()
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected)


def test_pixel_auroc_one_class_is_nan() -> None:
    maps, masks = random_case()
    assert math.isnan(pixel_auroc(maps, np.zeros_like(masks)))


def test_image_auroc_matches_sklearn_and_nan_for_one_class() -> None:
    scores = np.array([0.1, 0.7, 0.3, 0.9, 0.4, 0.8])
    labels = np.array([0, 1, 0, 1, 1, 0])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert math.isnan(image_auroc(scores, np.ones(6)))


# ---------------------------------------------------------------- detection accuracy


def test_detection_accuracy_hand_case() -> None:
    # Normals 0.1, 0.4 below 0.5 (right), 0.6 above (wrong): 2/3. Anomalies 0.5 (>= counts)
    # and 0.9 both right: 1. Balanced: (2/3 + 1) / 2 = 5/6.
    scores = np.array([0.1, 0.4, 0.6, 0.5, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    assert detection_accuracy(scores, labels, 0.5) == pytest.approx(5 / 6)


def test_detection_accuracy_single_class_uses_that_class() -> None:
    assert detection_accuracy(np.array([0.2, 0.8]), np.array([1, 1]), 0.5) == pytest.approx(0.5)


def test_minmax_normalise() -> None:
    np.testing.assert_allclose(minmax_normalise(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(minmax_normalise(np.array([3.0, 3.0])), [0.0, 0.0])


def test_paper_detection_accuracy_uses_minmax() -> None:
    # Raw scores are all >= 0.5, so a raw threshold calls everything anomalous (0.5).
    # Min-max gives [0, .375, .625, .5, 1]: same pattern as the hand case above, 5/6.
    scores = np.array([10.0, 40.0, 60.0, 50.0, 90.0])
    labels = np.array([0, 0, 0, 1, 1])
    assert detection_accuracy(scores, labels, 0.5) == pytest.approx(0.5)
    assert paper_detection_accuracy(scores, labels) == pytest.approx(5 / 6)


# ---------------------------------------------------------------- IoU


def test_pixel_iou_hand_case() -> None:
    masks = np.zeros((3, 4, 4))
    maps = np.zeros((3, 4, 4))
    # Image 0: 4 true pixels, 5 predicted, 3 of them right -> IoU 3 / (4 + 5 - 3) = 1/2.
    masks[0, :2, :2] = 1
    maps[0, :2, :3] = 0.9
    maps[0, 1, 1] = 0.2
    # Image 1: empty mask, empty prediction -> IoU 1 (counted only with anomalous_only=False).
    maps[1] = 0.49
    # Image 2: empty mask, two false positives -> IoU 0.
    maps[2, 3, :2] = 0.5
    assert pixel_iou(maps, masks) == pytest.approx(1 / 2)
    assert pixel_iou(maps, masks, anomalous_only=False) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert pixel_iou(maps[:2], masks[:2], anomalous_only=False) == pytest.approx(3 / 4)
    # At 0.95 nothing is predicted: image 0 scores 0, the two empty images 1 each.
    assert pixel_iou(maps, masks, threshold=0.95, anomalous_only=False) == pytest.approx(2 / 3)


def test_pixel_iou_no_anomalous_image_is_nan() -> None:
    assert math.isnan(pixel_iou(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        pixel_iou(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))


# ---------------------------------------------------------------- PRO


def two_regions() -> tuple[np.ndarray, np.ndarray]:
    """One image: a 2x2 region and a separate 4x5 region; map covers only the small one."""
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1  # small, 4 px
    masks[0, 5:9, 3:8] = 1  # large, 20 px
    maps = np.zeros((1, 10, 10))
    maps[0, 1:3, 1:3] = 1.0
    return maps, masks


def test_pro_is_per_region_not_pixel_recall() -> None:
    maps, masks = two_regions()
    fpr, pro, thresholds = pro_curve(maps, masks, num_thresholds=5)
    at_one = np.flatnonzero(thresholds == 1.0)[0]
    # Small region fully found, large one not at all: PRO 0.5, while pixel recall is 4/24.
    assert pro[at_one] == pytest.approx(0.5)
    assert fpr[at_one] == 0.0
    # The curve starts at (0, 0) (threshold +inf) and ends at (1, 1) (threshold = map min).
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_aupro_two_regions_hand_value() -> None:
    # Curve: (0, 0) -> (0, 0.5) -> ... -> (0, 0.5) -> (1, 1). Interpolated at 0.3: 0.65.
    # Area on [0, 0.3]: 0.3 * (0.5 + 0.65) / 2 = 0.1725; normalised: 0.575.
    maps, masks = two_regions()
    assert aupro(maps, masks) == pytest.approx(0.575)


def test_aupro_perfect_and_inverted() -> None:
    _, masks = random_case()
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    assert aupro(1.0 - perfect, masks) < 0.05


def test_aupro_random_map_is_chance_level() -> None:
    # For an uninformative map PRO ~= FPR, so the normalised area up to 0.3 is ~0.15.
    rng = np.random.default_rng(1)
    _, masks = random_case(seed=2, n=20, size=32)
    assert aupro(rng.random(masks.shape), masks) == pytest.approx(0.15, abs=0.03)


def test_pro_curve_matches_brute_force() -> None:
    maps, masks = random_case(seed=3)
    fpr, pro, thresholds = pro_curve(maps, masks, num_thresholds=17)
    regions = []
    for i in range(len(masks)):
        lab = label_components(masks[i], connectivity=2)
        regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
    normal = masks == 0
    for t, f, p in zip(thresholds, fpr, pro, strict=True):
        pred = maps >= t
        assert f == pytest.approx(pred[normal].mean())
        assert p == pytest.approx(np.mean([pred[i][region].mean() for i, region in regions]))


def test_pro_uses_eight_connectivity() -> None:
    # Two diagonal pixels are one region with 8-connectivity (three with 4-connectivity would
    # give 1/3); finding only the separate third pixel then gives PRO 1/2.
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 1
    masks[0, 4, 4] = 1
    maps = np.zeros((1, 6, 6))
    maps[0, 4, 4] = 1.0
    _, pro, thresholds = pro_curve(maps, masks, num_thresholds=3)
    assert pro[thresholds == 1.0][0] == pytest.approx(0.5)


def test_aupro_nan_without_positives() -> None:
    assert math.isnan(aupro(np.random.default_rng(0).random((2, 8, 8)), np.zeros((2, 8, 8))))


def test_aupro_is_fast() -> None:
    maps, masks = random_case(seed=4, n=40, size=128)
    start = time.perf_counter()
    aupro(maps, masks)
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- F1, thresholds


def test_f1_max_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(60) < 0.3
    scores = np.round(rng.random(60) + 0.5 * labels, 2)  # rounding makes ties
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        best = max(best, 2 * tp / (pred.sum() + labels.sum()))
    assert f1_max(scores, labels) == pytest.approx(best)
    # Pixels: flattened maps and masks go through the same function.
    maps, masks = random_case()
    assert 0.0 < f1_max(maps, masks) <= 1.0
    assert math.isnan(f1_max(scores, np.zeros(60)))


def test_normal_threshold_quantile() -> None:
    scores = np.arange(100.0)  # 0 .. 99
    # 0.99 quantile sits at index 98.01; "higher" takes 99. 0.95 -> 94.05 -> 95.
    assert normal_threshold(scores) == 99.0
    assert normal_threshold(scores, 0.05) == 95.0
    assert normal_threshold(scores.reshape(10, 10), 0.0) == 99.0
    with pytest.raises(ValueError):
        normal_threshold(scores, 1.0)


# ---------------------------------------------------------------- summary


def summary_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    maps, masks = random_case(seed=6, n=6, size=16)
    # Images 0-2 carry blobs (anomalous); make the rest normal with empty masks.
    masks[3:] = 0
    masks[:3, 2:5, 2:5] = 1
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.4, 0.8, 0.2, 0.5, 0.1])
    types = ["crack", "hole", "crack", "good", "good", "good"]
    return maps, masks, scores, labels, types


def test_summarize_keys_and_grouping() -> None:
    maps, masks, scores, labels, types = summary_case()
    out = summarize(maps, masks, scores, labels, types)
    assert set(out) == {"overall", "per_type"}
    assert set(out["per_type"]) == {"crack", "hole"}
    for group in [out["overall"], *out["per_type"].values()]:
        assert set(group) == METRIC_KEYS
    assert (out["overall"]["n_images"], out["overall"]["n_anomalous"]) == (6, 3)
    crack = out["per_type"]["crack"]
    assert (crack["n_images"], crack["n_anomalous"]) == (5, 2)
    select = [0, 2, 3, 4, 5]  # the cracks with all normal images
    assert crack["image_auroc"] == pytest.approx(image_auroc(scores[select], labels[select]))
    assert crack["detection_accuracy"] == pytest.approx(
        paper_detection_accuracy(scores[select], labels[select])
    )
    assert crack["pixel_auroc"] == pytest.approx(pixel_auroc(maps[select], masks[select]))
    assert crack["aupro"] == pytest.approx(aupro(maps[select], masks[select]))
    assert out["per_type"]["hole"]["n_images"] == 4
    assert out["overall"]["pixel_iou_all"] == pytest.approx(pixel_iou(maps, masks, anomalous_only=False))
    assert isinstance(out["overall"]["pixel_iou"], float)
    assert isinstance(out["overall"]["n_images"], int)


def test_summarize_fixed_image_threshold() -> None:
    maps, masks, scores, labels, types = summary_case()
    out = summarize(maps, masks, scores, labels, types, image_threshold=0.45)
    assert out["overall"]["detection_accuracy"] == pytest.approx(detection_accuracy(scores, labels, 0.45))


def test_summarize_without_masks_is_json_ready() -> None:
    maps, _, scores, labels, types = summary_case()
    out = summarize(maps, None, scores, labels, types)
    for group in [out["overall"], *out["per_type"].values()]:
        for key in ("pixel_iou", "pixel_iou_all", "pixel_auroc", "aupro", "pixel_f1_max"):
            assert group[key] is None
        assert group["image_auroc"] is not None
    json.dumps(out, allow_nan=False)


def test_summarize_nan_becomes_none() -> None:
    # All masks empty: pixel AUROC, AUPRO, F1 and anomalous-only IoU are undefined.
    maps, masks, scores, labels, types = summary_case()
    out = summarize(maps, np.zeros_like(masks), scores, labels, types)
    overall = out["overall"]
    assert overall["pixel_auroc"] is None
    assert overall["aupro"] is None
    assert overall["pixel_iou"] is None
    assert overall["pixel_f1_max"] is None
    assert isinstance(overall["pixel_iou_all"], float)
    json.dumps(out, allow_nan=False)


def test_summarize_maps_in_threads_equals_one_at_a_time() -> None:
    """Several maps summarised in threads give each map's own `summarize`, under its name, and the
    options (here a fixed image threshold and pixels left out) reach every one."""
    maps, masks, scores, labels, types = summary_case()
    rng = np.random.default_rng(1)
    jobs = {f"m{k}": (maps * rng.random(), scores + rng.random(scores.shape)) for k in range(5)}
    valid = np.array([1, 0, 1, 1, 1, 1], bool)
    options = {"image_threshold": 0.5, "pixel_valid": valid}
    for workers in (None, 1, 3):
        out = summarize_maps(jobs, masks, labels, types, workers=workers, **options)
        assert list(out) == list(jobs)
        for name, (m, s) in jobs.items():
            assert out[name] == summarize(m, masks, s, labels, types, **options)
    assert out["m0"] != summarize(jobs["m0"][0], masks, jobs["m0"][1], labels, types)


def test_summarize_maps_runs_one_map_at_a_time_when_threads_would_not_fit(monkeypatch) -> None:
    """Threads each hold a map's temporaries; when `METRICS_MEMORY` affords only one, no pool is made."""
    from cavga import metrics

    maps, masks, scores, labels, types = summary_case()
    jobs = {"a": (maps, scores), "b": (maps * 0.5, scores)}
    monkeypatch.setattr(metrics, "METRICS_MEMORY", metrics.SUMMARY_BYTES_PER_PIXEL * masks.size * 2 - 1)

    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool was made")

    monkeypatch.setattr(metrics, "ThreadPoolExecutor", no_pool)
    monkeypatch.setattr(metrics.os, "cpu_count", lambda: 2)
    out = summarize_maps(jobs, masks, labels, types)
    assert out["a"] == summarize(maps, masks, scores, labels, types)
    monkeypatch.setattr(metrics, "METRICS_MEMORY", metrics.SUMMARY_BYTES_PER_PIXEL * masks.size * 2)
    with pytest.raises(AssertionError, match="thread pool"):
        summarize_maps(jobs, masks, labels, types)


def test_summarize_pixel_metrics_match_the_exact_ones() -> None:
    """`summarize` counts pixels on quantised maps (no sorting); on continuous maps its figures stay
    within 1e-5 of scikit-learn's and of the exact PRO curve, and where the maps hold few distinct
    values (coarser than the levels) they are the exact ones."""
    rng = np.random.default_rng(3)
    n, size = 12, 48
    masks = np.zeros((n, size, size))
    for i in range(4, n):
        y, x = rng.integers(4, size - 12, 2)
        masks[i, y : y + rng.integers(3, 10), x : x + rng.integers(3, 10)] = 1
    smooth = rng.random((n, size, size)).astype(np.float32) * 0.6 + 0.35 * masks
    coarse = np.round(smooth * 50) / 50
    labels = (masks.sum((1, 2)) > 0).astype(int)
    types = ["good" if lab == 0 else ("a" if i % 2 else "b") for i, lab in enumerate(labels)]
    for maps, tol in ((smooth, 1e-5), (coarse, 1e-12)):
        out = summarize(maps, masks, maps.max((1, 2)), labels, types)
        for name, group in [("overall", out["overall"]), *out["per_type"].items()]:
            select = np.array(
                [lab == 0 or name in ("overall", t) for lab, t in zip(labels, types, strict=True)]
            )
            m, k = maps[select], masks[select]
            assert group["pixel_auroc"] == pytest.approx(roc_auc_score(k.ravel(), m.ravel()), abs=tol)
            assert group["pixel_f1_max"] == pytest.approx(f1_max(m, k), abs=max(tol, 1e-12))
            assert group["aupro"] == pytest.approx(aupro(m, k), abs=max(tol, 1e-9) * 10)
