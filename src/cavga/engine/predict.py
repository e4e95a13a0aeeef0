"""`cavga predict`: score images and write their maps, masks, overlays and one CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from cavga.api import Prediction, PredictorBase
from cavga.data import IMAGE_EXTENSIONS, ImageDataset, Sample, default_workers, loader
from cavga.errors import DataError, reason, warn
from cavga.visualize import prediction_overlay, save_map_png, save_mask_png, save_png

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


def _csv_text(path: Path) -> str:
    """A file name as the CSV holds it (names that are not valid UTF-8 carry backslash escapes)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def finished_rows(out: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier `predictions.csv` in `out` whose image is done: a complete line (a
    killed run may have left half of its last one), no error (a failed image is tried again) and its
    map, mask and overlay on disk. Keyed by the CSV's file name."""
    path = out / "predictions.csv"
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if ln.endswith("\n")]
    rows = {}
    for row in csv.DictReader(lines):
        complete = None not in row and None not in row.values() and set(row) == set(CSV_FIELDS)
        if (
            complete
            and not row["error"]
            and all((out / row[k]).is_file() for k in ("map", "mask", "overlay"))
        ):
            rows[row["file"]] = row
    return rows


def predict_files(
    predictor: PredictorBase,
    inputs: list[str | Path],
    out_dir: str | Path,
    batch_size: int | None = None,
    workers: int | None = None,
    resume: bool = False,
    cache: str | Path | None = None,
) -> tuple[Path, int]:
    """Predict every input; returns the CSV path and the number of images that failed.

    Images are decoded once each, in `workers` processes (None: `default_workers()`; `cache`: see
    `cavga.data.stream.DiskCache`), and scored in
    batches of `batch_size` (default: the run's); each image's map, mask and overlay are written as
    its batch is done, and its CSV row at once, in input order. With `resume`, images an earlier run
    in `out_dir` finished (see `finished_rows`) keep their row and are not scored again, so a killed
    run ends with every image once in the CSV.

    Whatever goes wrong with one image (it cannot be read, or anything unexpected) becomes that
    image's row with its error, and the others go on, so one bad file never loses the work done
    on the rest. File names that are not valid UTF-8 are written with backslash escapes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = collect_inputs(inputs)
    done = finished_rows(out) if resume else {}
    todo = [k for k, (path, _) in enumerate(items) if _csv_text(path) not in done]
    if batch_size:
        predictor.batch_size = batch_size
    dataset = ImageDataset(
        [Sample(items[k][0], 0, "", None) for k in todo],
        predictor.image_size,
        predictor.channels,
        originals=True,
        grey_only=predictor.channels == 1,
        cache=cache,
    )
    workers = default_workers() if workers is None else workers
    rows = _scored_rows(predictor, loader(dataset, predictor.batch_size, workers), items, todo, out)
    failed = 0
    csv_path = out / "predictions.csv"
    with csv_path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for path, _ in items:
            row = done.get(_csv_text(path)) or next(rows)  # the batches come in input order
            failed += bool(row["error"])
            writer.writerow(row)
            f.flush()  # rows written so far survive whatever happens next
    return csv_path, failed


def _scored_rows(
    predictor: PredictorBase, batches, items: list[tuple[Path, str]], todo: list[int], out: Path
) -> Iterator[dict[str, str | int]]:
    """The CSV rows of the images `todo`, in order, from the loader's batches."""
    for batch in batches:
        rows: dict[int, dict[str, str | int]] = {}
        for i, error in batch.failed:
            rows[i] = _failed(items[todo[i]][0], error)
        if batch.index:
            names = [str(items[todo[i]][0]) for i in batch.index]
            pils = list(zip(batch.originals, names, strict=True))
            x = batch.stack()
            try:
                preds: list = predictor.predict_tensors(x, pils)
            except Exception:  # one image may have failed its batch: each on its own says which
                preds = [_predict_alone(predictor, x[j : j + 1], pils[j]) for j in range(len(pils))]
            for i, original, p in zip(batch.index, batch.originals, preds, strict=True):
                path, stem = items[todo[i]]
                try:
                    if isinstance(p, Exception):
                        raise p
                    rows[i] = _write_outputs(predictor, p, original, path, stem, out)
                except Exception as e:  # one image's failure, whatever it is, must not stop the others
                    rows[i] = _failed(path, reason(e))
        yield from (rows[i] for i in sorted(rows))


def _predict_alone(predictor: PredictorBase, x, pil) -> Prediction | Exception:
    try:
        return predictor.predict_tensors(x, [pil])[0]
    except Exception as e:
        return e


def _failed(path: Path, error: str) -> dict[str, str | int]:
    warn(f"skipped {path}: {error}")
    return {**dict.fromkeys(CSV_FIELDS, ""), "file": str(path), "error": error}


def _write_outputs(
    predictor: PredictorBase, p: Prediction, image: Image.Image, path: Path, stem: str, out: Path
) -> dict[str, str | int]:
    """Write one image's map, mask and overlay, and return its CSV row."""
    names = {k: f"{stem}_{k}.png" for k in ("map", "mask", "overlay")}
    save_map_png(out / names["map"], p.anomaly_map)
    save_mask_png(out / names["mask"], p.mask)
    # The overlay is drawn on the image at its own size (as a viewer shows it), as the user knows it.
    overlay = prediction_overlay(image, p.anomaly_map, p.mask, predictor.channels == 1)
    save_png(overlay, out / names["overlay"])
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
