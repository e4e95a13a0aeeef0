"""`cavga export`: one ONNX graph whose maps and scores match PyTorch's, predicting like a run folder."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cavga import load_run
from cavga.api import OnnxPredictor
from cavga.cli import main
from cavga.data import load_image
from cavga.engine.run import load_checkpoint, load_model
from cavga.errors import CavgaError
from cavga.export import export_onnx, read_metadata
from cavga.maps import MapMaker
from tiny_data import small_demo

SIZE = 32


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Path:
    return tiny_run


def test_graph_matches_pytorch_at_batch_1_and_8(run: Path, tmp_path: Path) -> None:
    """Maps within 1e-4, and every image and pixel decision identical, for the run's own map and
    the other calibrated maps."""
    graphs_match_pytorch(run, tmp_path, ("memory", "latent-stats", "fusion"))


def test_graph_of_a_run_with_two_encoders_matches_pytorch(tmp_path: Path) -> None:
    """The extra encoder's stages are in the graph: its memory map and fused score match PyTorch's."""
    data = small_demo(tmp_path / "data")
    run = tmp_path / "run"
    settings = ["--model", "cavga-ru", "--image-size", str(SIZE), "--steps", "1", "--batch-size", "4"]
    settings += ["--feature-encoders", "2", "--quiet", "--device", "cpu"]
    assert main(["train", "--data", str(data), *settings, "--out", str(run)]) == 0
    assert len(load_model(load_checkpoint(run), torch.device("cpu"))[0].extra_encoders) == 1
    graphs_match_pytorch(run, tmp_path, ("memory",))


def graphs_match_pytorch(run: Path, tmp_path: Path, names: tuple[str, ...]) -> None:
    """Each map of `names` exported from `run` gives PyTorch's maps and scores at batches of 1 and 8."""
    ort = pytest.importorskip("onnxruntime")
    ckpt = load_checkpoint(run)
    model, cfg = load_model(ckpt, torch.device("cpu"))
    test = sorted((Path(ckpt["data"]["root"]) / "brick" / "test").rglob("*.png"))
    x = torch.stack([load_image(p, SIZE, cfg.channels) for p in test[:8]])
    for name in names:
        path = export_onnx(run, tmp_path / f"{name}.onnx", name)
        meta = read_metadata(path)
        assert (meta["anomaly_map"], meta["image_size"], meta["channels"]) == (name, SIZE, cfg.channels)
        threshold = meta["threshold"]
        assert threshold == pytest.approx(float(ckpt["calibration"]["image_thresholds"][name]))
        session = ort.InferenceSession(str(path))
        maker = MapMaker(model, cfg, ckpt["calibration"], torch.device("cpu"), maps=(name,))
        for batch in (x[:1], x):
            ref = maker(batch)
            m, s = session.run(None, {"images": batch.numpy()})
            ref_m, ref_s = ref[name].numpy(), ref[f"score/{name}"].numpy()
            assert m.shape == ref_m.shape == (len(batch), SIZE, SIZE)
            np.testing.assert_allclose(m, ref_m, atol=1e-4, rtol=0)
            np.testing.assert_allclose(s, ref_s, atol=1e-4, rtol=1e-4)  # fused scores reach the hundreds
            np.testing.assert_array_equal(m >= 0.5, ref_m >= 0.5)
            np.testing.assert_array_equal(s >= threshold, ref_s >= threshold)


def test_predict_with_the_exported_file_gives_the_same_rows(run: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(run), "--out", str(onnx_path)]) == 0
    folder = Path(load_checkpoint(run)["data"]["root"]) / "brick" / "test"
    rows = {}
    for name, model in (("torch", str(run)), ("onnx", str(onnx_path))):
        assert main(["predict", model, str(folder), "--out", str(tmp_path / name)]) == 0
        rows[name] = list(csv.DictReader((tmp_path / name / "predictions.csv").open()))
    assert rows["torch"][0].keys() == rows["onnx"][0].keys()
    assert [r["file"] for r in rows["torch"]] == [r["file"] for r in rows["onnx"]]
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert float(a["score"]) == pytest.approx(
            float(b["score"]), rel=1e-4, abs=1e-4
        )  # 6 digits in the CSV
        assert (a["anomalous"], a["threshold"], a["error"]) == (b["anomalous"], b["threshold"], b["error"])
    predictor = load_run(onnx_path)
    assert isinstance(predictor, OnnxPredictor)
    p = predictor.predict(next(folder.rglob("*.png")))
    assert p.anomaly_map.shape == p.mask.shape and p.reconstruction is None and p.attention is None


def test_gradcam_maps_are_refused_with_one_line(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(run), "--anomaly-map", "paper", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "Grad-CAM" in err and "backward pass" in err and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_says_how_to_install(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(CavgaError, match=r"pip install 'cavga\[export\]'"):
        export_onnx(run, tmp_path / "m.onnx")


def test_a_foreign_onnx_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(CavgaError, match="cannot read"):
        load_run(path)
