"""Streaming data: images decoded by worker processes, kept in memory only while they fit, cached on
disk; batched and resumable prediction."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cavga.data.stream as stream
from cavga.api import load_run
from cavga.cli import main
from cavga.data import list_split, load_image, scan
from cavga.engine.predict import finished_rows, predict_files
from cavga.engine.run import load_checkpoint
from tiny_data import small_demo

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_demo(tmp_path_factory.mktemp("stream-data"), seed=3, category="gravel")


def _train(data: Path, out: Path, *extra: str) -> dict:
    argv = ["train", "--data", str(data), "--model", "cavga-ru", "--image-size", str(SIZE), "--steps", "3"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), "--quiet", "--device", "cpu", *extra]) == 0
    return load_checkpoint(out)


def _same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_streamed_training_equals_training_in_memory(data, tmp_path, monkeypatch) -> None:
    in_memory = _train(data, tmp_path / "memory", "--workers", "0")
    monkeypatch.setattr(stream, "IN_MEMORY_BYTES", 0)  # nothing fits: every batch is decoded again
    monkeypatch.setattr(stream, "FEW_IMAGES", 0)  # by worker processes, however few the images
    streamed = _train(data, tmp_path / "streamed", "--workers", "2")
    assert _same_tensors(in_memory["model"], streamed["model"])
    assert _same_tensors(in_memory["calibration"], streamed["calibration"])
    assert in_memory["data"]["train_files"] == streamed["data"]["train_files"]


def test_scan_keeps_images_in_memory_only_within_the_budget(data) -> None:
    samples = list_split(data / "gravel", "train")
    small, _ = scan(samples, SIZE, 1, budget=len(samples) * SIZE * SIZE)
    assert small.images is not None and all(t.dtype == torch.uint8 for t in small.images)
    large, _ = scan(samples, SIZE, 1, budget=len(samples) * SIZE * SIZE - 1)
    assert large.images is None
    for a, b in zip(small.batches(5), large.batches(5), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(next(small.batches(1))[0], load_image(samples[0].path, SIZE, 1))


def test_disk_cache_is_used_and_follows_changed_files(data, tmp_path, monkeypatch) -> None:
    samples = list_split(data / "gravel", "train")[:3]
    first, _ = scan(samples, SIZE, 1, cache=tmp_path / "cache", budget=0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    expected = torch.cat(list(first.batches(3)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(stream, "open_image", no_decoding)
    again, skipped = scan(samples, SIZE, 1, cache=tmp_path / "cache", budget=0)
    assert not skipped and torch.equal(torch.cat(list(again.batches(3))), expected)
    monkeypatch.undo()
    # A file that changes (new content, new modification time) is decoded again, not read stale.
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(samples[0].path)
    os.utime(samples[0].path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed, _ = scan(samples, SIZE, 1, cache=tmp_path / "cache", budget=0)
    assert float(next(changed.batches(1)).abs().sum()) == 0.0
    # A damaged cache file is decoded again as well.
    for f in (tmp_path / "cache").glob("*.npy"):
        f.write_bytes(b"damaged")
    assert torch.equal(torch.cat(list(scan(samples, SIZE, 1, cache=tmp_path / "cache")[0].batches(3)))[1:],
                       expected[1:])  # fmt: skip


def _folder_of_images(folder: Path, data: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    sources = sorted((data / "gravel" / "test").rglob("*.png"))
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        p.write_bytes(sources[i % len(sources)].read_bytes())
        paths.append(p)
    return paths


def test_batched_prediction_equals_one_at_a_time(tiny_run, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(stream, "FEW_IMAGES", 0)  # worker processes decode, however few the images
    paths = _folder_of_images(tmp_path / "in", data, 7)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    predictor = load_run(tiny_run, "cpu")
    rows = {}
    for bs, workers in ((1, 0), (4, 2)):
        csv_path, failed = predict_files(predictor, [tmp_path / "in"], tmp_path / f"out{bs}", bs, workers)
        with csv_path.open() as f:
            rows[bs] = list(csv.DictReader(f))
        assert failed == 1
    assert [r["file"] for r in rows[4]] == [str(p) for p in sorted([*paths, tmp_path / "in" / "broken.png"])]
    for a, b in zip(rows[1], rows[4], strict=True):
        assert a["file"] == b["file"] and a["error"] == b["error"]
        if not a["error"]:
            assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-4, abs=1e-6)
    single = predictor.predict(paths[0])
    assert float(rows[4][1]["score"]) == pytest.approx(single.score, rel=1e-4, abs=1e-6)


def test_finished_rows_ignore_half_lines_errors_and_missing_outputs(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    header = "file,score,threshold,anomalous,anomalous_fraction,class_probability,map,mask,overlay,error\n"
    for stem in ("a", "b"):
        for k in ("map", "mask", "overlay"):
            (out / f"{stem}_{k}.png").write_bytes(b"x")
    (out / "predictions.csv").write_text(
        header
        + "a.png,1,0.5,1,0.1,,a_map.png,a_mask.png,a_overlay.png,\n"
        + "c.png,,,,,,,,,cannot be decoded\n"  # failed: tried again
        + "d.png,1,0.5,1,0.1,,d_map.png,d_mask.png,d_overlay.png,\n"  # its outputs are missing
        + "b.png,1,0.5,1,0.1,,b_map.png,b_mask.png,b_ov"  # cut by a kill
    )
    assert list(finished_rows(out)) == ["a.png"]


def test_killed_prediction_resumes_with_every_image_once(tiny_run, data, tmp_path) -> None:
    paths = _folder_of_images(tmp_path / "in", data, 24)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "cavga", "predict", str(tiny_run), str(tmp_path / "in"), "--out", str(out)]
    argv += ["--batch-size", "2", "--workers", "1", "--device", "cpu", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_path = out / "predictions.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if csv_path.is_file() and csv_path.read_text().count("\n") >= 4:  # header and 3 rows
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = csv_path.read_text().count("\n") - 1
    assert 3 <= first < len(paths), "the kill came too late to test anything"
    done_before = set(finished_rows(out))
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [str(p) for p in paths]  # every image once, in input order
    assert all(not r["error"] and (out / r["overlay"]).is_file() for r in rows)
    assert done_before <= {r["file"] for r in rows}
