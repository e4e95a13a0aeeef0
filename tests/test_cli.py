"""End to end through the command line on tiny demo data: train, test, predict, resume."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from cavga.cli import main
from cavga.data import make_demo_data
from cavga.engine import train as train_mod
from cavga.engine.interrupt import StopAtStepEnd
from cavga.engine.run import load_checkpoint
from cavga.engine.train import batch_indices
from cavga.errors import RunError
from cavga.networks import MODELS

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(
        tmp_path_factory.mktemp("demo"),
        seed=0,
        image_size=SIZE,
        n_train=12,
        n_test_good=4,
        n_test_defect=2,
        categories=("brick",),
    )


def train_args(data: Path, out: Path, model: str, steps: int = 3, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--category",
        "brick",
        "--model",
        model,
        "--image-size",
        str(SIZE),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize("model", list(MODELS))
def test_train_test_predict(data: Path, tmp_path: Path, model: str, capsys) -> None:
    """Every model in `cavga models` trains a few steps, records its model and setting, evaluates
    with every metric (without the images a weakly supervised run trained on), and predicts on
    files and folders."""
    run = tmp_path / "run"
    assert main(train_args(data, run, model)) == 0
    ckpt = load_checkpoint(run)
    setting = MODELS[model].setting
    steps = 0 if setting == "training-free" else 3  # the anchors learn nothing
    assert ckpt["step"] == steps and ckpt["model_name"] == model and ckpt["calibration"] is not None
    assert {"model", "opt_g", "opt_d", "config", "step", "version"} <= set(ckpt)
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["model"], recorded["setting"]) == (model, MODELS[model].setting)
    weak = MODELS[model].setting == "weakly-supervised"
    assert len(ckpt["data"]["anomalous_files"]) == (1 if weak else 0)  # 2 % of 10, at least one

    assert main(["test", str(run), "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("pixel_iou", "pixel_auroc", "image_auroc", "detection_accuracy", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert set(metrics["per_type"]) == {"scratch", "stain", "hole", "patch", "color"}
    assert set(metrics["references"]) == {"image-independent", "residual", "whole-image"}
    assert metrics["references"]["image-independent"]["overall"]["image_auroc"] == 0.5
    assert (metrics["model"], metrics["setting"]) == (model, MODELS[model].setting)
    assert metrics["n_removed_for_training"] == (1 if weak else 0)
    # C decides beside the map for every model that has it (weakly and self-supervised).
    has_classifier = setting in ("weakly-supervised", "self-supervised")
    assert ("classifier_detection_accuracy" in metrics) == has_classifier
    n_test = 4 + 5 * 2 - metrics["n_removed_for_training"]
    assert metrics["n_images"] == n_test
    assert len(list((run / "panels").glob("*.png"))) == n_test
    assert "pixel_auroc" in capsys.readouterr().out

    out = tmp_path / "preds"
    test_dir = data / "brick" / "test"
    assert (
        main(
            [
                "predict",
                str(run),
                str(test_dir / "hole"),
                str(test_dir / "good" / "000.png"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 3
    for row in rows:
        assert not row["error"]
        for k in ("map", "mask", "overlay"):
            assert (out / row[k]).is_file()
        # The fused score is standardised on normal images, so it may be negative; higher is more anomalous.
        assert math.isfinite(float(row["score"])) and row["anomalous"] in ("0", "1")
        assert (row["class_probability"] != "") == has_classifier
        if has_classifier:
            assert 0.0 <= float(row["class_probability"]) <= 1.0


def test_resume_matches_uninterrupted_run(data: Path, tmp_path: Path, monkeypatch, capsys, ctrl_c) -> None:
    """Ctrl-C pressed as step 3 of 4 begins lets that step finish, saves the run at step 3, and
    resuming it gives the same weights as 4 steps in one go."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_args(data, full, "cavga-du", 4)) == 0

    real_step, calls = train_mod.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends; the handler runs at once
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    assert main(train_args(data, part, "cavga-du", 4)) == 2
    err = capsys.readouterr().err
    assert "stopping after this step" in err and "interrupted at step 3/4" in err
    assert load_checkpoint(part)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert main(["train", "--out", str(part), "--resume", "--quiet"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (part / "log.csv").read_text().count("\n") == 5  # header + 4 steps, no duplicates


def test_a_second_ctrl_c_stops_inside_the_step_and_saves_nothing(
    data: Path, tmp_path: Path, monkeypatch, capsys, ctrl_c
) -> None:
    """A second Ctrl-C stops at once, inside the step: the weights may be half updated, so the
    checkpoint of step 2 (saved every 2 steps) is left as it was."""
    part = tmp_path / "part"
    real_step, calls = train_mod.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    assert main([*train_args(data, part, "cavga-du", 4), "--checkpoint-every", "2"]) == 2
    err = capsys.readouterr().err
    assert "stopped inside step 3/4, unsaved" in err and "(step 2), continue with --resume" in err
    assert len(calls) == 3 and load_checkpoint(part)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_stays_ignored_where_it_was(ctrl_c) -> None:
    """A run started with SIGINT ignored (`nohup`, a script's background job) does not start
    listening to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopAtStepEnd() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
    assert not stop.pressed and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_failed_calibration_loses_no_training(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Training is saved, optimiser states included, before calibration starts: a calibration that
    fails leaves the last step on disk, and `--resume` calibrates it without training again, ending
    with the checkpoint an uninterrupted run writes."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_args(data, full, "cavga-du", 3)) == 0

    def failing(*args, **kwargs):
        raise RunError("calibration stopped")

    real_calibrate, real_step, steps = train_mod.calibrate, train_mod.train_step, []
    monkeypatch.setattr(train_mod, "calibrate", failing)
    assert main(train_args(data, part, "cavga-du", 3)) == 2
    saved = load_checkpoint(part)
    assert saved["step"] == 3 and saved["calibration"] is None and saved["opt_g"]["state"]
    monkeypatch.setattr(train_mod, "calibrate", real_calibrate)
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    assert main(["train", "--out", str(part), "--resume", "--quiet"]) == 0
    assert steps == []
    a, b = load_checkpoint(full), load_checkpoint(part)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, state in a["opt_g"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["opt_g"]["state"][i]["exp_avg_sq"]), i
    assert a["calibration"]["image_thresholds"] == b["calibration"]["image_thresholds"]


def test_same_seed_same_run(data: Path, tmp_path: Path) -> None:
    """Two runs with one seed give identical weights; another seed gives different ones."""
    runs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main([*train_args(data, tmp_path / name, "cavga-du", 2), "--seed", seed]) == 0
        runs.append(load_checkpoint(tmp_path / name)["model"])
    key = "encoder.body.0.weight"
    assert torch.equal(runs[0][key], runs[1][key])
    assert not torch.equal(runs[0][key], runs[2][key])


def test_batches_cover_each_epoch_once() -> None:
    """Batch order is a seeded permutation per epoch with the incomplete last batch dropped."""
    epoch = torch.cat([batch_indices(10, 4, s, seed=0) for s in range(2)])
    assert len(set(epoch.tolist())) == 8
    assert torch.equal(batch_indices(10, 4, 5, seed=0), batch_indices(10, 4, 5, seed=0))


def test_errors_are_one_line_messages(data: Path, tmp_path: Path, capsys) -> None:
    """Bad input ends with a clear message and exit code 2, not a traceback."""
    assert main(["test", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(train_args(tmp_path / "empty", tmp_path / "r", "cavga-du")) == 2
    assert "empty" in capsys.readouterr().err
    assert main(train_args(data, tmp_path / "r2", "cavga-du", 1, "--image-size", "48")) == 2
    assert "power of two" in capsys.readouterr().err
    assert main(train_args(data, tmp_path / "r4", "cavga-du", 1, "--attention", "nope")) == 2
    assert "unknown attention" in capsys.readouterr().err
    run = tmp_path / "r3"
    assert main(train_args(data, run, "cavga-du", 1)) == 0
    assert main(train_args(data, run, "cavga-du", 1)) == 2  # never overwrites a run
    assert "already holds a run" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(run), str(bad), "--out", str(tmp_path / "p")]) == 1
    assert "cannot be decoded" in capsys.readouterr().err


def test_python_api_predicts_on_paths_pil_and_arrays(data: Path, tmp_path: Path) -> None:
    """`load_run(...).predict` takes a path, a PIL image or an array and maps at the input's own size."""
    import numpy as np
    from PIL import Image

    from cavga import load_run
    from cavga.errors import DataError

    run = tmp_path / "run"
    assert main(train_args(data, run, "cavga-du", 2)) == 0
    predictor = load_run(run, device="cpu")
    path = data / "brick" / "test" / "hole" / "000.png"
    from_path = predictor.predict(path)
    from_pil = predictor.predict(Image.open(path))
    from_array = predictor.predict(np.asarray(Image.open(path)))
    assert from_path.score == pytest.approx(from_pil.score) == pytest.approx(from_array.score)
    np.testing.assert_allclose(from_path.anomaly_map, from_array.anomaly_map, atol=1e-6)
    assert from_path.is_anomalous == (from_path.score >= from_path.threshold)

    big = predictor.predict(np.random.default_rng(0).random((50, 70)))
    assert big.anomaly_map.shape == big.mask.shape == (50, 70)
    assert big.anomaly_map.min() >= 0.0 and big.anomaly_map.max() <= 1.0
    np.testing.assert_array_equal(big.mask, big.anomaly_map >= 0.5)

    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 200
    with pytest.raises(DataError, match="colour image"):
        predictor.predict(colour)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        predictor.predict(np.full((8, 8), 3.0))


def test_predictor_without_extras_stops_at_the_encoder_and_changes_nothing(tiny_run: Path) -> None:
    """`cavga predict` writes neither the reconstruction nor the attention, so its predictor
    (`extras=False`) computes neither: with the default map the decoder never runs, and the maps and
    scores are the full predictor's."""
    import numpy as np

    from cavga import load_run

    full, lean = load_run(tiny_run, device="cpu"), load_run(tiny_run, device="cpu", extras=False)
    decoded = {"full": 0, "lean": 0}
    for key, predictor in (("full", full), ("lean", lean)):
        predictor.model.decoder.register_forward_hook(
            lambda *_, key=key: decoded.__setitem__(key, decoded[key] + 1)
        )
    shape = (40, 48) if full.channels == 1 else (40, 48, 3)
    images = [np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8) for i in range(5)]
    for p, q in zip(full.predict_batch(images), lean.predict_batch(images), strict=True):
        assert q.score == pytest.approx(p.score, rel=1e-6)
        np.testing.assert_allclose(q.anomaly_map, p.anomaly_map, atol=1e-6)
        assert p.reconstruction is not None and p.attention is not None
        assert q.reconstruction is None and q.attention is None
    assert decoded["full"] > 0 and decoded["lean"] == 0


@pytest.mark.parametrize(
    "model", [n for n, s in MODELS.items() if s.setting != "weakly-supervised" and s.family != "ablation"]
)
def test_no_real_anomaly_reaches_training_or_calibration(data: Path, tmp_path: Path, monkeypatch, model: str):
    """Unsupervised, self-supervised and training-free runs open no file under test/ or ground_truth/
    while training and calibrating: every image file opened is recorded, and the check fails if any
    anomalous image, normal test image or mask is among them."""
    import PIL.Image

    opened: list[Path] = []
    real_open = PIL.Image.open

    def recording_open(fp, *args, **kwargs):
        if isinstance(fp, (str, Path)):
            opened.append(Path(fp).resolve())
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", recording_open)
    assert main(train_args(data, tmp_path / "run", model, 2)) == 0
    train_dir = (data / "brick" / "train").resolve()
    assert opened and all(train_dir in p.parents for p in opened), sorted(
        set(opened) - set(train_dir.rglob("*"))
    )


def test_self_supervised_training_sees_synthetic_anomalies_with_their_masks(
    data: Path, tmp_path, monkeypatch
):
    """cavga-rs trains on normal images, about half of them given a synthetic anomaly: the input
    differs from the clean target exactly on the mask, the label is 1 exactly where the mask is not
    empty, and the decoder's target is the clean image. The anomalies are seeded by step."""
    seen: list[tuple] = []
    real_step = train_mod.train_step

    def spy(model, x, labels, cfg, opt_g, opt_d, adversarial, target=None, masks=None, **kwargs):
        seen.append((x.clone(), labels.clone(), target.clone(), masks.clone()))
        return real_step(
            model, x, labels, cfg, opt_g, opt_d, adversarial, target=target, masks=masks, **kwargs
        )

    monkeypatch.setattr(train_mod, "train_step", spy)
    assert main(train_args(data, tmp_path / "a", "cavga-rs", 4)) == 0
    first = list(seen)
    assert len(first) == 4
    for x, labels, target, masks in first:
        changed = (x - target).abs().amax(1) > 0
        assert torch.equal(changed, masks.bool())
        assert torch.equal(labels, (masks.flatten(1).amax(1) > 0).long())
    assert 0 < sum(int(lab.sum()) for _, lab, _, _ in first) < 16
    seen.clear()
    assert main(train_args(data, tmp_path / "b", "cavga-rs", 4)) == 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, seen, strict=True))
