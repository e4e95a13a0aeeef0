"""`cavga predict`: score images and write their maps, masks, overlays and one CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from cavga.api import PredictorBase
from cavga.data import IMAGE_EXTENSIONS, open_image
from cavga.errors import DataError, reason, warn
from cavga.visualize import prediction_overlay, save_map_png, save_mask_png

CSV_FIELDS = (
    "file",
    "score",
    "threshold",
    "anomalous",
    "anomalous_fraction",
    "class_probability",  # weakly supervised models: C's anomalous probability
    "map",
    "mask",
    "overlay",
    "error",
)


def collect_inputs(inputs: list[str | Path]) -> list[tuple[Path, str]]:
    """(image path, output stem) for files and every image under folders (recursively, sorted).

    Stems keep the sub-folder path (`hole_000`) so images with the same name never overwrite
    each other's outputs.
    """
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # Hidden files and folders (.DS_Store, ._x.png, .thumbnails/) are never images of the
            # user's; rglob does not follow symbolic links to folders, so a link loop ends.
            files = sorted(
                p
                for p in item.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
                and p.is_file()
            )
            if not files:
                raise DataError(f"{item}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            found += [(p, "_".join(p.relative_to(item).with_suffix("").parts)) for p in files]
        elif item.is_file():
            found.append((item, item.stem))
        elif item.is_symlink():
            raise DataError(f"{item} is a broken or looping symbolic link")
        else:
            raise DataError(f"not found: {item}")
    stems = [s for _, s in found]
    return [(p, s if stems.count(s) == 1 else f"{s}_{i}") for i, (p, s) in enumerate(found)]


def predict_files(
    predictor: PredictorBase, inputs: list[str | Path], out_dir: str | Path
) -> tuple[Path, int]:
    """Predict every input; returns the CSV path and the number of images that failed.

    Whatever goes wrong with one image (it cannot be read, or anything unexpected) becomes that
    image's row with its error, and the others go on, so one bad file never loses the work done
    on the rest. File names that are not valid UTF-8 are written with backslash escapes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    csv_path = out / "predictions.csv"
    with csv_path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for path, stem in collect_inputs(inputs):
            try:
                row = _predict_one(predictor, path, stem, out)
            except Exception as e:  # one image's failure, whatever it is, must not stop the others
                failed += 1
                warn(f"skipped {path}: {reason(e)}")
                row = {"file": str(path), "error": reason(e)}
            writer.writerow(row)
            f.flush()  # rows written so far survive whatever happens next
    return csv_path, failed


def _predict_one(predictor: PredictorBase, path: Path, stem: str, out: Path) -> dict[str, str | int]:
    """Score one file, write its map, mask and overlay, and return its CSV row."""
    image = open_image(path)  # decoded once, for the prediction and the overlay
    p = predictor.predict(image, str(path))
    names = {k: f"{stem}_{k}.png" for k in ("map", "mask", "overlay")}
    save_map_png(out / names["map"], p.anomaly_map)
    save_mask_png(out / names["mask"], p.mask)
    # The overlay is drawn on the image at its own size (as a viewer shows it), as the user knows it.
    prediction_overlay(image, p.anomaly_map, p.mask, predictor.channels == 1).save(out / names["overlay"])
    return {
        "file": str(path),
        "score": f"{p.score:.6g}",
        "threshold": f"{p.threshold:.6g}",
        "anomalous": int(p.is_anomalous),
        "anomalous_fraction": f"{p.mask.mean():.6g}",
        "class_probability": "" if p.class_probability is None else f"{p.class_probability:.6g}",
        **names,
        "error": "",
    }
