"""`cavga serve` through FastAPI's test client: good, bad, oversize and several images, the page,
server-side batching, and the exported .onnx behind the same service."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from cavga import load_run
from cavga.cli import main
from cavga.engine.run import load_checkpoint
from cavga.serve import Batcher, create_app

SIZE = 32


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def images(run: Path) -> dict[str, bytes]:
    root = Path(load_checkpoint(run)["data"]["root"]) / "brick" / "test"
    return {p.name + p.parent.name: p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def client(run: Path):
    with TestClient(create_app(run, device="cpu", max_upload_mb=0.05)) as c:
        yield c


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health_info_and_page(client, run: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert (info["model"], info["anomaly_map"], info["image_size"]) == ("cavga-du", "memory", SIZE)
    assert info["training_data"]["category"] == "brick" and info["training_data"]["n_train"] > 0
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'type="file"' in page.text and "fetch(" in page.text and "cavga-du, memory map" in page.text
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing loaded from elsewhere


def test_good_image_gets_score_decision_map_and_overlay(client, images, run: Path) -> None:
    name, data = next(iter(images.items()))
    r = client.post("/predict", files=[("file", (name, data, "image/png"))])
    assert r.status_code == 200
    (res,) = r.json()["results"]
    direct = load_run(run, device="cpu").predict(Image.open(io.BytesIO(data)))
    assert res["score"] == pytest.approx(direct.score, rel=1e-5, abs=1e-6)
    assert res["is_anomalous"] == direct.is_anomalous and res["threshold"] == pytest.approx(direct.threshold)
    assert res["anomalous_fraction"] == pytest.approx(direct.mask.mean())
    assert decode(res["map_png"]).size == decode(res["overlay_png"]).size == (SIZE, SIZE)
    r = client.post("/predict?images=false", files=[("file", (name, data, "image/png"))])
    assert r.json()["results"][0]["map_png"] is None


def test_several_images_in_one_request_keep_their_order(client, images) -> None:
    files = [("file", (n, d, "image/png")) for n, d in list(images.items())[:4]]
    files.insert(2, ("file", ("broken.png", b"not an image", "image/png")))
    r = client.post("/predict?images=false", files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["file"] for x in results] == [f[1][0] for f in files]
    assert [bool(x["error"]) for x in results] == [False, False, True, False, False]
    assert "broken.png cannot be decoded" in results[2]["error"]


def test_an_undecodable_image_is_400_with_the_reason(client) -> None:
    r = client.post("/predict", files=[("file", ("text.png", b"hello", "image/png"))])
    assert r.status_code == 400
    assert "text.png cannot be decoded as an image" in r.json()["detail"][0]["error"]
    r = client.post("/predict", files=[("file", ("empty.png", b"", "image/png"))])
    assert r.status_code == 400 and "empty" in r.json()["detail"][0]["error"]


def test_a_colour_image_for_a_grey_run_is_that_images_error(client, images) -> None:
    colour = io.BytesIO()
    Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (200, 20, 20)])).save(
        colour, format="PNG"
    )
    name, data = next(iter(images.items()))
    files = [("file", ("red.png", colour.getvalue(), "image/png")), ("file", (name, data, "image/png"))]
    results = client.post("/predict?images=false", files=files).json()["results"]
    assert "red.png: a colour image" in results[0]["error"] and results[1]["error"] is None


def test_oversize_upload_is_413(client) -> None:
    big = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)  # ≈ 90 kB PNG > 50 kB
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    r = client.post("/predict", files=[("file", ("big.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit still holds as the body arrives
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(10):
            yield bytes(10_000)

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_concurrent_requests_are_scored_in_one_batch(run: Path, images) -> None:
    """Eight images submitted together reach the model as one batch, and each gets its own answer."""
    predictor = load_run(run, device="cpu")
    pils = [Image.open(io.BytesIO(d)) for d in images.values()][:8]

    async def go():
        batcher = Batcher(predictor, max_batch=16, max_wait_ms=200)
        task = asyncio.create_task(batcher.run())
        out = await asyncio.gather(*(batcher.predict(im, str(i)) for i, im in enumerate(pils)))
        task.cancel()
        return batcher.batch_sizes, out

    sizes, out = asyncio.run(go())
    assert list(sizes) == [len(pils)]
    direct = predictor.predict_batch(pils)
    assert [p.score for p in out] == pytest.approx([p.score for p in direct], rel=1e-5, abs=1e-6)


def test_the_exported_file_serves_the_same_answers(run: Path, images, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(run), "--out", str(onnx_path)]) == 0
    files = [("file", (n, d, "image/png")) for n, d in list(images.items())[:3]]
    with TestClient(create_app(run, device="cpu")) as a, TestClient(create_app(onnx_path, device="cpu")) as b:
        ra = a.post("/predict?images=false", files=files).json()["results"]
        rb = b.post("/predict?images=false", files=files).json()["results"]
        assert b.get("/info").json()["backend"] == "onnxruntime"
    for x, y in zip(ra, rb, strict=True):
        assert (
            x["score"] == pytest.approx(y["score"], rel=1e-4, abs=1e-4)
            and x["is_anomalous"] == y["is_anomalous"]
        )
