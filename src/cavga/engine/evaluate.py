"""`cavga test`: anomaly maps, image scores and metrics of a trained run on a test split."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from cavga.data import category_dir, has_masks, infer_channels, list_split
from cavga.data.stream import ImageDataset, default_workers, loader
from cavga.engine.run import load_checkpoint, load_model, resolve_device, write_json
from cavga.errors import DataError, RunError, warn
from cavga.maps import MAPS, MapMaker, cheap_maps, run_maps
from cavga.metrics import pro_curve, summarize, summarize_maps
from cavga.networks import MODELS
from cavga.visualize import chw_to_image, save_panel

METRIC_KEYS = ("pixel_iou", "pixel_auroc", "aupro", "image_auroc", "detection_accuracy")


def check_channels(data_channels: int, model_channels: int, where: str) -> None:
    """A colour image cannot go into a grey model (its colour would be thrown away silently)."""
    if data_channels == 3 and model_channels == 1:
        raise DataError(f"{where}: colour images, but the run was trained on greyscale images")


def check_run_matches(ckpt: dict[str, Any], cat_dir: Path, force: bool = False) -> None:
    """Refuse to test a run on another category than it was trained on (its normal statistics and
    thresholds describe that category only), unless `force`."""
    trained = ckpt["data"].get("category_name")
    if trained and cat_dir.resolve().name != trained and not force:
        raise RunError(
            f"the run holds model {ckpt['model_name']} ({ckpt.get('setting', 'unsupervised')}) trained on "
            f"category {trained!r} of {ckpt['data']['root']}, but {cat_dir} is category "
            f"{cat_dir.resolve().name!r}; train a run for it, or pass --force to test anyway"
        )


def evaluation_samples(ckpt: dict[str, Any], cat_dir: Path) -> tuple[list, int]:
    """The test split without the images the run trained on (the weakly supervised 2 %)."""
    samples = list_split(cat_dir, "test")
    trained_on = set(ckpt["data"].get("anomalous_files") or ())
    kept = [s for s in samples if str(s.path.resolve()) not in trained_on]
    if not kept:
        raise DataError(f"{cat_dir / 'test'}: every test image was used for training")
    return kept, len(samples) - len(kept)


def evaluate(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    category: str | None = None,
    panels: bool = True,
    device: str = "auto",
    force: bool = False,
    all_maps: bool = False,
    workers: int | None = None,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run on `<category>/test` (data and category default to the training ones).

    Writes `metrics.json` and, with `panels`, one PNG panel per test image to `<run>/panels`. The
    Grad-CAM variants (a backward pass each) are computed only with `all_maps`. Images are decoded in
    `workers` processes (None: `default_workers()`), optionally through the disk `cache`.
    Top-level metrics are those of the run's `anomaly_map`; `maps` holds every map's metrics and
    `references` the image-independent map (the mean held-out normal map on every image), the
    whole-image nearest-neighbour score alone (image metrics) and the residual alone, so a fixed
    pattern is never mistaken for localisation.
    """
    run = Path(run_dir)
    ckpt = load_checkpoint(run)
    if ckpt.get("calibration") is None:
        raise RunError(
            f"{run} has not finished training (no calibration); continue it with `cavga train --resume`"
        )
    dev = resolve_device(device)
    model, cfg = load_model(ckpt, dev)
    root = data_dir or ckpt["data"]["root"]
    category = category if category is not None else ckpt["data"]["category"]
    cat_dir = category_dir(root, category)
    check_run_matches(ckpt, cat_dir, force)
    samples, n_removed = evaluation_samples(ckpt, cat_dir)
    check_channels(infer_channels(samples), cfg.channels, str(samples[0].path.parent.parent))
    t0 = time.perf_counter()
    with_masks = has_masks(samples)
    maker = MapMaker(model, cfg, ckpt["calibration"], dev, maps=None if all_maps else cheap_maps(cfg))
    chosen = cfg.anomaly_map
    dataset = ImageDataset(samples, cfg.image_size, cfg.channels, masks=with_masks, cache=cache)
    parts: dict[str, list[np.ndarray]] = {}
    kept: list[int] = []
    mask_parts: list[torch.Tensor] = []
    skipped: list[dict[str, str]] = []
    workers = default_workers() if workers is None else workers
    for batch in loader(dataset, cfg.batch_size, workers):  # decoded ahead by the workers
        for i, error in batch.failed:
            skipped.append({"file": str(samples[i].path), "error": error})
            warn(f"skipped {samples[i].path}: {error}")
        if not batch.index:
            continue
        x = batch.stack()
        out = run_maps(maker, x, len(x))
        for k, v in out.items():
            if k in MAPS or k.startswith("score/") or k in ("global_score", "class_probability"):
                parts.setdefault(k, []).append(v)  # what the metrics need; not reconstructions
        kept += batch.index
        mask_parts += batch.masks
        if panels:
            batch_masks = torch.stack(batch.masks).numpy() if with_masks else None
            write_panels(run / "panels", [samples[i] for i in batch.index], x, out, chosen, batch_masks)
    if not kept:
        raise DataError(
            f"{samples[0].path.parent.parent}: none of the {len(samples)} test images can be used "
            "(see the lines above)"
        )
    samples = [samples[i] for i in kept]
    out = {k: np.concatenate(v) for k, v in parts.items()}
    masks = torch.stack(mask_parts).numpy() if with_masks else None
    labels = np.array([s.label for s in samples])
    pixel_valid, empty_masks = None, []
    if masks is not None:
        # An anomalous image whose mask marks nothing has a wrong mask, not a defect-free image: its
        # pixels would count as normal and punish a map that finds the defect. It keeps its image
        # label, and pixel metrics leave it out.
        empty = (labels == 1) & ~masks.any(axis=(1, 2))
        pixel_valid = ~empty
        empty_masks = [str(samples[i].mask_path) for i in np.flatnonzero(empty)]
        for m in empty_masks:
            warn(f"{m} marks no pixel of its anomalous image; the image counts for image metrics only")
    seconds = time.perf_counter() - t0
    types = [s.defect_type for s in samples]

    jobs = {name: (out[name], out[f"score/{name}"]) for name in MAPS if name in out}
    mean_map = ckpt["calibration"]["mean_maps"][chosen].numpy()
    # A fixed map cannot rank images: its scores are constant, so image AUROC comes out at 0.5.
    jobs["image-independent"] = (np.broadcast_to(mean_map, out[chosen].shape), np.zeros(len(samples)))
    per_map = summarize_maps(jobs, masks, labels, types, map_threshold=0.5, pixel_valid=pixel_valid)
    references = {"image-independent": per_map.pop("image-independent"), "residual": per_map["residual"]}
    if "global_score" in out:
        # The whole-image nearest-neighbour score alone (image metrics only): what the fused score adds.
        references["whole-image"] = summarize(None, None, out["global_score"], labels, types)
    threshold = ckpt["calibration"]["image_thresholds"][chosen]
    calibrated = summarize(None, None, out[f"score/{chosen}"], labels, types, image_threshold=threshold)
    result: dict[str, Any] = {
        **{k: per_map[chosen]["overall"][k] for k in METRIC_KEYS},
        "anomaly_map": chosen,
        "model": cfg.model,
        "setting": MODELS[cfg.model].setting,
        "preset": cfg.preset,
        "image_size": cfg.image_size,
        "data": str(Path(root).resolve()),
        "category": category,
        "n_images": len(samples),
        "n_removed_for_training": n_removed,
        "skipped_files": skipped,  # images that could not be used: {file, error}
        "empty_masks": empty_masks,  # anomalous images left out of the pixel metrics
        "has_masks": with_masks,
        "image_threshold": threshold,
        "detection_accuracy_calibrated": calibrated["overall"]["detection_accuracy"],
        "per_type": per_map[chosen]["per_type"],
        "maps": per_map,
        "all_maps": all_maps,  # whether `maps` holds the Grad-CAM variants too
        "references": references,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(samples) / seconds, 2),
    }
    if "class_probability" in out:
        # CAVGA-w: C decides (probability ≥ 0.5 is anomalous), as in the paper.
        decided = summarize(None, None, out["class_probability"], labels, types, image_threshold=0.5)
        result["classifier_detection_accuracy"] = decided["overall"]["detection_accuracy"]
    write_json(run / "metrics.json", result)
    write_details(run, samples, labels, out[chosen], out[f"score/{chosen}"], masks, pixel_valid)
    return result


def write_details(run: Path, samples, labels, maps, scores, masks, pixel_valid) -> None:
    """`scores.csv` (one row per test image: its score and, with masks, the IoU of map ≥ 0.5 with
    its mask) and `curves.npz` (the image ROC, and with masks the pixel ROC and the PRO curve) of
    the run's map, for `cavga report`."""
    iou = np.full(len(samples), np.nan)
    curves: dict[str, np.ndarray] = {}
    if len(set(labels.tolist())) == 2:
        curves["image_fpr"], curves["image_tpr"], _ = roc_curve(labels, scores)
    if masks is not None:
        valid = pixel_valid if pixel_valid is not None else np.ones(len(samples), bool)
        pred, truth = maps >= 0.5, masks > 0.5
        union = (pred | truth).sum(axis=(1, 2))
        iou = np.where(
            (labels == 1) & valid & (union > 0),
            (pred & truth).sum(axis=(1, 2)) / np.maximum(union, 1),
            np.nan,
        )
        m, t = maps[valid], truth[valid]
        if t.any() and not t.all():
            step = max(1, m.size // 2_000_000)  # a strided subsample is plenty for a picture
            fpr, tpr, _ = roc_curve(t.ravel()[::step], m.ravel()[::step], drop_intermediate=True)
            curves["pixel_fpr"], curves["pixel_tpr"] = fpr, tpr
            curves["pro_fpr"], curves["pro"], _ = pro_curve(m, t)
    np.savez_compressed(run / "curves.npz", **curves)
    with (run / "scores.csv").open("w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.writer(f)
        w.writerow(["file", "defect_type", "label", "score", "iou", "panel"])
        for i, s in enumerate(samples):
            w.writerow([str(s.path), s.defect_type, int(labels[i]), f"{scores[i]:.6g}",
                        "" if np.isnan(iou[i]) else f"{iou[i]:.4f}", panel_name(s)])  # fmt: skip


def panel_name(s) -> str:
    """The file name of a test image's panel in `<run>/panels`."""
    return f"{s.defect_type}_{s.path.stem}.png"


def write_panels(
    folder: Path, samples, images: torch.Tensor, out: dict[str, np.ndarray], chosen: str, masks
) -> None:
    """One PNG per image: input, reconstruction, attention, map overlay, predicted and true contours."""
    for i, s in enumerate(samples):
        save_panel(
            folder / panel_name(s),
            chw_to_image(images[i].numpy()),
            chw_to_image(out["recon"][i]),
            out["attention"][i],
            out[chosen][i],
            out[chosen][i] >= 0.5,
            masks[i] if masks is not None and s.label else None,
            title=f"{s.defect_type}/{s.path.name}  score {out[f'score/{chosen}'][i]:.4f}",
        )


def format_table(result: dict[str, Any]) -> str:
    """Plain-text tables: every map (and the two references), then the chosen map per defect type."""
    cols = ("pixel_auroc", "aupro", "pixel_iou", "image_auroc", "detection_accuracy")

    def fmt(v) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f"{'map':<28}" + "".join(f"{c:>20}" for c in cols)]
    rows = [
        (n + (" *" if n == result["anomaly_map"] else ""), m["overall"]) for n, m in result["maps"].items()
    ]
    rows += [(f"ref: {k}", v["overall"]) for k, v in result["references"].items() if k != "residual"]
    for name, m in rows:
        lines.append(f"{name:<28}" + "".join(f"{fmt(m[c]):>20}" for c in cols))
    lines.append("")
    lines.append(f"{'defect type (' + result['anomaly_map'] + ')':<28}" + "".join(f"{c:>20}" for c in cols))
    for t, m in result["per_type"].items():
        lines.append(f"{t:<28}" + "".join(f"{fmt(m[c]):>20}" for c in cols))
    return "\n".join(lines)
