"""Every bad input × every entry point: print what happens, as a Markdown table.

    python scripts/bad_inputs.py --out /tmp/bad

Builds tiny demo data with the corpus of `tests/corpus.py` in train/good and test/good and untidy
masks in a defect type, then runs the real command line (`cavga train`, `cavga test`,
`cavga predict`) in subprocesses and the Python API in this process, and reports per input:
used ("handled"), refused with its one-line message, or not seen ("ignored"), and any traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cavga import load_run
from cavga.data import make_demo_data
from cavga.errors import CavgaError
from corpus import make_images, make_masks

SIZE = 32


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cavga", *argv], capture_output=True, text=True, errors="replace"
    )


def short(message: str) -> str:
    """The message for a table cell: file names without their folders, at most 120 characters."""
    return "refused: " + re.sub(r"[^\s']*/", "", message).replace("|", "/")[:120]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    root = make_demo_data(
        args.out / "data", image_size=SIZE, n_train=12, n_test_good=4, n_test_defect=2, categories=("brick",)
    )
    cat = root / "brick"
    base = np.asarray(Image.open(cat / "train" / "good" / "000.png").convert("L"))
    images = make_images(cat / "train" / "good", base)
    make_images(cat / "test" / "good", base)
    masks = make_masks(cat / "ground_truth" / "untidy", cat / "test" / "untidy", base)
    run, preds = args.out / "run", args.out / "preds"

    settings = ["--model", "cavga-du", "--image-size", str(SIZE), "--steps", "2", "--batch-size", "4"]
    train = cli("train", "--data", str(root), *settings, "--out", str(run), "--quiet", "--device", "cpu")
    test = cli("test", str(run), "--no-panels", "--device", "cpu")
    predict = cli("predict", str(run), str(cat / "train" / "good"), "--out", str(preds))
    runs = {"train": train, "test": test, "predict": predict}
    tracebacks = {k: "Traceback" in r.stderr for k, r in runs.items()}

    config = json.loads((run / "config.json").read_text())["data"]
    trained = {Path(f).name for f in config["train_files"] + config["calib_files"]}
    train_skipped = {Path(s["file"]).name: s["error"] for s in config["skipped_files"]}
    metrics = json.loads((run / "metrics.json").read_text())
    test_skipped = {Path(s["file"]).name: s["error"] for s in metrics["skipped_files"]}
    empty = {Path(m).name.removesuffix("_mask.png") + ".png" for m in metrics["empty_masks"]}
    with (preds / "predictions.csv").open(encoding="utf-8") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    predictor = load_run(run, device="cpu")
    from fastapi.testclient import TestClient

    from cavga.serve import create_app

    service = TestClient(create_app(run, device="cpu")).__enter__()

    def served(path: Path) -> str:
        """What the service answers when the file's bytes are posted (under a name HTTP can carry)."""
        name = path.name.encode("utf-8", "backslashreplace").decode()
        r = service.post("/predict?images=false", files=[("file", (name, path.read_bytes(), "image/png"))])
        if r.status_code >= 500:
            tracebacks["service"] = True
            return f"HTTP {r.status_code}"
        if r.status_code == 400:
            return f"400: {short(r.json()['detail'][0]['error'])}"
        error = r.json()["results"][0]["error"]
        return "handled" if error is None else short(error)

    def api(path: Path) -> str:
        try:
            predictor.predict(path)
            return "handled"
        except CavgaError as e:
            return short(str(e))
        except Exception as e:  # what the table must never show
            tracebacks["api"] = True
            return f"TRACEBACK {type(e).__name__}: {e}"

    def outcome(name: str, used: bool, refused: dict[str, str]) -> str:
        if name in refused:
            return short(refused[name])
        return "handled" if used else "ignored"

    print("| input | expected | train | test | predict | API | service |\n|---|---|---|---|---|---|---|")
    for e in images:
        shown = e.name.encode("utf-8", "backslashreplace").decode()  # as predictions.csv writes it
        row = rows.get(shown)
        pred = "ignored" if row is None else (short(row["error"]) if row["error"] else "handled")
        tested = (cat / "test" / "good" / e.name).is_file() and e.expected != "ignored"
        api_cell = api(cat / "train" / "good" / e.name) if e.expected != "ignored" else "not applicable"
        cells = [
            outcome(e.name, e.name in trained, train_skipped),
            outcome(e.name, tested, test_skipped),
            pred,
            api_cell,
            served(cat / "train" / "good" / e.name) if e.expected != "ignored" else "not applicable",
        ]
        print(f"| {e.what} | {e.expected} | " + " | ".join(cells) + " |")
    for e in masks:
        name = e.name + ".png"
        if name in test_skipped:
            cell = short(test_skipped[name])
        elif name in empty:
            cell = "handled: image metrics only"
        else:
            cell = "handled: binarised (> 127)"
        unread = " | ".join(["not read"] * 3)
        print(f"| {e.what} | {e.expected} | not read (no masks in training) | {cell} | {unread} |")
    codes = ", ".join(f"{k} {r.returncode}" for k, r in runs.items())
    print(f"\nexit codes: {codes} (predict: 1 when some images failed)")
    where = ", ".join(k for k, v in tracebacks.items() if v) or "none"
    print(f"tracebacks: {sum(tracebacks.values())} ({where})")
    return 1 if any(tracebacks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
