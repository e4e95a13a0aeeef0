"""The bad-input corpus through every entry point: train, test, predict and the Python API.

Each corpus file is either used, refused with one line naming it while the other images go on,
or not seen at all (see `tests/corpus.py`); no entry point ends in a traceback.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cavga import load_run
from cavga.cli import main
from cavga.data import load_mask, make_demo_data
from cavga.errors import DataError
from corpus import HANDLED, IGNORED, REFUSED, make_images, make_masks, noisy_mask_truth, rotated_view

SIZE = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Tiny demo data with the corpus in train/good and test/good, untidy masks in a defect type,
    and a run trained on it."""
    root = make_demo_data(
        tmp_path_factory.mktemp("demo"), seed=0, image_size=SIZE, n_train=12, n_test_good=4, n_test_defect=2,
        categories=("brick",),
    )  # fmt: skip
    cat = root / "brick"
    base = np.asarray(Image.open(cat / "train" / "good" / "000.png").convert("L"))
    images = make_images(cat / "train" / "good", base)
    make_images(cat / "test" / "good", base)
    masks = make_masks(cat / "ground_truth" / "untidy", cat / "test" / "untidy", base)
    run = tmp_path_factory.mktemp("runs") / "run"
    args = ["train", "--data", str(root), "--model", "cavga-du", "--image-size", str(SIZE), "--steps", "2",
            "--batch-size", "4", "--out", str(run), "--quiet", "--device", "cpu"]  # fmt: skip
    code = main(args)
    return {
        "root": root,
        "cat": cat,
        "base": base,
        "images": images,
        "masks": masks,
        "run": run,
        "code": code,
    }


def names(entries, expected: str) -> set[str]:
    return {e.name for e in entries if e.expected == expected}


def test_train_uses_the_good_files_and_reports_the_others(corpus, capsys) -> None:
    assert corpus["code"] == 0
    config = json.loads((corpus["run"] / "config.json").read_text())
    data = config["data"]
    used = {Path(f).name for f in data["train_files"] + data["calib_files"]}
    skipped = {Path(s["file"]).name: s["error"] for s in data["skipped_files"]}
    assert set(skipped) == names(corpus["images"], REFUSED)
    assert names(corpus["images"], HANDLED) <= used
    assert not names(corpus["images"], IGNORED) & (used | set(skipped))
    for name, error in skipped.items():
        assert name in error and "\n" not in error


def test_test_skips_unusable_images_and_keeps_empty_masks_out_of_pixel_metrics(corpus, capsys) -> None:
    assert main(["test", str(corpus["run"]), "--device", "cpu", "--no-panels"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    metrics = json.loads((corpus["run"] / "metrics.json").read_text())
    skipped = {Path(s["file"]).name for s in metrics["skipped_files"]}
    assert skipped == names(corpus["images"], REFUSED) | {"wrong_size_mask.png"}
    for name in skipped:
        assert sum(name in line for line in err.splitlines()) == 1  # one line each
    assert [Path(m).name for m in metrics["empty_masks"]] == ["empty_mask_mask.png"]
    # The empty-mask image still counts as anomalous for the image metrics.
    n_good = 4 + len(names(corpus["images"], HANDLED))
    assert metrics["n_images"] == n_good + 5 * 2 + 2
    assert metrics["per_type"]["untidy"]["n_anomalous"] == 2
    assert metrics["pixel_auroc"] is not None


def test_noisy_mask_is_binarised_at_half_the_scale(corpus) -> None:
    cat = corpus["cat"]
    mask = load_mask(
        cat / "ground_truth" / "untidy" / "noisy_mask_mask.png",
        cat / "test" / "untidy" / "noisy_mask.png",
        SIZE,
    )
    np.testing.assert_array_equal(mask[0].numpy() > 0.5, noisy_mask_truth(corpus["base"]))


def test_predict_writes_a_row_for_every_image_and_goes_on(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "preds"
    folder = corpus["cat"] / "train" / "good"
    assert main(["predict", str(corpus["run"]), str(folder), "--out", str(out)]) == 1  # some failed
    err = capsys.readouterr().err
    assert "Traceback" not in err
    text = (out / "predictions.csv").read_text(encoding="utf-8")  # valid UTF-8 despite the name
    rows = {Path(r["file"]).name: r for r in csv.DictReader(text.splitlines())}
    corpus_rows = {n: r for n, r in rows.items() if not n[:3].isdigit()}
    expected = names(corpus["images"], HANDLED) | names(corpus["images"], REFUSED)
    assert set(corpus_rows) == {n.encode("utf-8", "backslashreplace").decode() for n in expected}
    for name, row in corpus_rows.items():
        refused = name in names(corpus["images"], REFUSED)
        assert bool(row["error"]) == refused, (name, row["error"])
        if refused:
            assert name in row["error"] and "unexpected" not in row["error"]
    # The rotated JPEG is scored as a viewer shows it (tall), and a 1×1 image gets a 1×1 map.
    assert Image.open(out / rows["rotated.jpg"]["map"]).size == (SIZE * 3 // 4, SIZE)
    assert Image.open(out / rows["one_pixel.png"]["map"]).size == (1, 1)


def test_exif_rotation_is_applied_as_a_viewer_shows_it(corpus) -> None:
    from cavga.data import open_image

    seen = np.asarray(open_image(corpus["cat"] / "train" / "good" / "rotated.jpg").convert("L"), float)
    view = rotated_view(corpus["base"]).astype(float)
    assert seen.shape == view.shape
    assert np.abs(seen - view).mean() < 3  # equal up to JPEG loss


def test_api_predicts_or_raises_one_line(corpus) -> None:
    predictor = load_run(corpus["run"], device="cpu")
    folder = corpus["cat"] / "train" / "good"
    for entry in corpus["images"]:
        if entry.expected == IGNORED:
            continue
        path = folder / entry.name
        if entry.expected == HANDLED:
            p = predictor.predict(path)
            assert np.isfinite(p.score) and p.anomaly_map.shape == p.mask.shape
        else:
            with pytest.raises(DataError) as info:
                predictor.predict(path)
            assert entry.name in str(info.value) and "\n" not in str(info.value)


def test_an_unexpected_error_on_one_image_becomes_its_row(corpus, tmp_path, monkeypatch) -> None:
    """Anything that goes wrong with one image (here a fault inside the model) is that image's
    error; the images after it are still scored."""
    from cavga.api import Predictor

    real = Predictor.predict_tensors

    def faulty(self, x, pils):
        if any("001" in name for _, name in pils):
            raise RuntimeError("boom")
        return real(self, x, pils)

    monkeypatch.setattr(Predictor, "predict_tensors", faulty)
    out = tmp_path / "preds"
    good = [str(corpus["cat"] / "test" / "good" / f"00{i}.png") for i in range(3)]
    assert main(["predict", str(corpus["run"]), *good, "--out", str(out)]) == 1
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert rows[1]["error"] == "unexpected error: RuntimeError: boom"


def test_loop_link_named_on_the_command_line_is_one_line(corpus, tmp_path, capsys) -> None:
    link = corpus["cat"] / "train" / "good" / "loop.png"
    assert main(["predict", str(corpus["run"]), str(link), "--out", str(tmp_path / "p")]) == 2
    assert "looping symbolic link" in capsys.readouterr().err


def test_unreadable_file_is_one_line(tmp_path, monkeypatch) -> None:
    """Permission bits do not bind root (as in CI), so the refusal is shown with open() failing."""
    from cavga.data import open_image

    path = tmp_path / "locked.png"
    Image.new("L", (4, 4)).save(path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(DataError, match=rf"{path} cannot be read: permission denied"):
        open_image(path)


def test_service_answers_every_corpus_file_in_one_request(corpus) -> None:
    """The service gets the files' bytes (it never reads a path): every usable one is scored, every
    other is that file's one-line error, and the request as a whole succeeds."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cavga.serve import create_app

    folder = corpus["cat"] / "train" / "good"
    sent = [e for e in corpus["images"] if e.expected != IGNORED]
    files = [("file", (f"f{i}.png", (folder / e.name).read_bytes(), "image/png")) for i, e in enumerate(sent)]
    with TestClient(create_app(corpus["run"], device="cpu")) as client:
        r = client.post("/predict?images=false", files=files)
    assert r.status_code == 200
    for entry, res in zip(sent, r.json()["results"], strict=True):
        assert (res["error"] is None) == (entry.expected == HANDLED), (entry.what, res["error"])
        if res["error"]:
            assert (
                res["file"] in res["error"] and "\n" not in res["error"] and "unexpected" not in res["error"]
            )
