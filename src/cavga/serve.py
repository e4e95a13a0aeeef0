"""`cavga serve`: a trained run (or an exported .onnx file) behind HTTP, with a web page.

- ``POST /predict``: one or several images (multipart, field ``file``, repeatable) → JSON per image:
  score, threshold, decision, anomalous fraction, and the map and overlay as base64 PNGs
  (``?images=false`` leaves the pictures out). An image that cannot be decoded is that image's
  ``error``; when every image of a request fails the answer is 400 with the reasons.
- ``GET /health``, ``GET /info`` (model, map, size, threshold, training data), ``GET /`` the page.

The model is loaded once per process. Requests that arrive together are scored in one batch: a
background task gathers up to ``max_batch`` images, waiting at most ``max_wait_ms`` after the first,
and runs them on one inference thread. Uploads above ``max_upload_mb`` get 413 before they are read
in full. The service reads no path a request names; it listens on 127.0.0.1 unless told otherwise.
FastAPI and uvicorn come with ``pip install 'cavga[serve]'``.
"""

import asyncio
import base64
import inspect
import io
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cavga import __version__
from cavga.api import Prediction, PredictorBase, load_run
from cavga.data import open_image
from cavga.errors import reason, require
from cavga.visualize import PNG_COMPRESS_LEVEL, map_image, prediction_overlay

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 5.0
ENV_RUN = "CAVGA_SERVE_RUN"  # how `cavga serve --workers N` tells each worker process what to load
ENV_OPTIONS = "CAVGA_SERVE_OPTIONS"


def require_serve() -> None:
    for module in ("fastapi", "multipart", "uvicorn"):
        require(module, "serve", "`cavga serve`")


@dataclass
class _Job:
    image: Image.Image
    name: str
    future: asyncio.Future


class Batcher:
    """Gathers the images of concurrent requests into batches for one inference thread."""

    def __init__(self, predictor: PredictorBase, max_batch: int, max_wait_ms: float):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="cavga-infer")
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest batches run, for /info and tests

    async def predict(self, image: Image.Image, name: str) -> Prediction:
        job = _Job(image, name, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                    break
            self.batch_sizes.append(len(jobs))
            results = await loop.run_in_executor(self.thread, self._score, jobs)
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    (job.future.set_exception if isinstance(result, Exception) else job.future.set_result)(
                        result
                    )

    def _score(self, jobs: list[_Job]) -> list[Prediction | Exception]:
        try:
            return list(self.predictor.predict_batch([j.image for j in jobs], [j.name for j in jobs]))
        except Exception:
            # One image spoilt the batch (a colour image for a grey run, say): score them one by
            # one, so its error is its own and the others are answered.
            out: list[Prediction | Exception] = []
            for j in jobs:
                try:
                    out.append(self.predictor.predict(j.image, j.name))
                except Exception as e:
                    out.append(e)
            return out


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _result(name: str, image: Image.Image, p: Prediction, grey: bool, pictures: bool) -> dict[str, Any]:
    return {
        "file": name,
        "score": p.score,
        "threshold": p.threshold,
        "is_anomalous": bool(p.is_anomalous),
        "anomalous_fraction": float(p.mask.mean()),
        "class_probability": p.class_probability,
        "map_png": _png(map_image(p.anomaly_map)) if pictures else None,
        "overlay_png": _png(prediction_overlay(image, p.anomaly_map, p.mask, grey)) if pictures else None,
        "error": None,
    }


class UploadLimit:
    """ASGI middleware: 413 for a request body above `limit` bytes, by its Content-Length or, when it
    has none, as soon as more than `limit` bytes have arrived (the app then sees the client gone,
    and whatever it answers is dropped)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send) -> None:
        body = f'{{"detail": "upload larger than {self.limit / 1e6:g} MB"}}'.encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refused = True
                await self._refuse(send)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not refused:
                raise


def create_app(
    run: str | Path,
    device: str = "auto",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
):
    """The FastAPI application for a run folder or an exported .onnx file (loaded now, once)."""
    require_serve()
    from fastapi import FastAPI, File, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool

    predictor = load_run(run, device, extras=False)  # answers carry neither reconstruction nor attention
    batcher = Batcher(predictor, max_batch, max_wait_ms)
    grey = predictor.channels == 1
    info = {
        "cavga_version": __version__,
        "run": Path(run).name,
        "model": predictor.model_name,
        "anomaly_map": predictor.map_name,
        "image_size": predictor.image_size,
        "channels": predictor.channels,
        "threshold": predictor.threshold,
        "map_threshold": 0.5,
        "backend": "onnxruntime" if Path(run).suffix.lower() == ".onnx" else "pytorch",
        "max_upload_mb": max_upload_mb,
        "max_batch": max_batch,
        "training_data": predictor.training,
    }

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.thread.shutdown(wait=False)

    app = FastAPI(title="cavga", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def get_info() -> dict:
        recent = batcher.batch_sizes
        return {**info, "mean_recent_batch": sum(recent) / len(recent) if recent else None}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.replace(
            "{{INFO}}", f"{info['model']}, {info['anomaly_map']} map, {info['image_size']} px"
        )

    @app.post("/predict")
    async def predict(file: list[UploadFile] = File(...), images: bool = True) -> dict:  # noqa: B008
        async def one(upload: UploadFile) -> dict[str, Any]:
            name = Path(upload.filename or "upload").name  # a name for messages, never a path to read
            try:
                image = await run_in_threadpool(open_image, Path(name), "an image", await upload.read())
                p = await batcher.predict(image, name)
                return await run_in_threadpool(_result, name, image, p, grey, images)
            except Exception as e:
                return {"file": name, "error": reason(e)}

        results = await asyncio.gather(*(one(u) for u in file))
        if all(r["error"] for r in results):
            raise HTTPException(400, detail=[{"file": r["file"], "error": r["error"]} for r in results])
        return {"results": results}

    return UploadLimit(app, int(max_upload_mb * 1e6)) if max_upload_mb > 0 else app


def app_from_environment():
    """The app for one `cavga serve --workers N` worker process (settings from the environment)."""
    return create_app(os.environ[ENV_RUN], **json.loads(os.environ.get(ENV_OPTIONS, "{}")))


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, **options) -> None:
    """Run the service until stopped (Ctrl-C)."""
    require_serve()
    import uvicorn

    if workers > 1:
        # Each worker process loads the model itself; uvicorn needs an import string for that.
        os.environ[ENV_RUN], os.environ[ENV_OPTIONS] = str(run), json.dumps(options)
        extra = {}
        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters:
            # A worker loads torch and the model before it answers (tens of seconds on a busy CPU);
            # uvicorn's default 5 s would restart it forever.
            extra["timeout_worker_healthcheck"] = 600
        uvicorn.run(
            "cavga.serve:app_from_environment", factory=True, host=host, port=port, workers=workers, **extra
        )
    else:
        uvicorn.run(create_app(run, **options), host=host, port=port)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cavga</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 56rem; color: #222; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 2.5rem; text-align: center; cursor: pointer; }
#drop.over { background: #eef; }
.result { display: flex; gap: 1.5rem; margin-top: 1.5rem; align-items: flex-start; }
.result img { width: 20rem; image-rendering: pixelated; border: 1px solid #ccc; }
.anomalous { color: #b00; font-weight: bold; } .normal { color: #070; font-weight: bold; }
.error { color: #b00; } small { color: #666; }
</style></head>
<body>
<h1>cavga</h1>
<p><small>{{INFO}}</small></p>
<div id="drop">Drop images here, or click to choose</div>
<input id="pick" type="file" accept="image/*" multiple hidden>
<div id="out"></div>
<script>
const $ = id => document.getElementById(id);
const drop = $("drop"), pick = $("pick"), out = $("out");
drop.onclick = () => pick.click();
pick.onchange = () => send(pick.files);
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => { e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files); };
async function send(files) {
  const form = new FormData();
  for (const f of files) form.append("file", f);
  out.textContent = "scoring…";
  const r = await fetch("predict", { method: "POST", body: form });
  const body = await r.json();
  out.textContent = "";
  const failed = Array.isArray(body.detail) ? body.detail : [{ file: "", error: body.detail }];
  const results = r.ok ? body.results : failed;
  for (const x of results) {
    const div = document.createElement("div");
    div.className = "result";
    if (x.error) {
      div.innerHTML = `<p class="error"></p>`;
      div.firstChild.textContent = x.file + ": " + x.error;  // text, never markup, from a file name
    } else {
      const verdict = x.is_anomalous ? '<span class="anomalous">anomalous</span>'
                                     : '<span class="normal">normal</span>';
      div.innerHTML = `<img alt="overlay" src="data:image/png;base64,${x.overlay_png}">` +
        `<div><h3></h3><p>${verdict}</p>` +
        `<p>score ${x.score.toFixed(4)} (threshold ${x.threshold.toFixed(4)})</p>` +
        `<p>anomalous area ${(100 * x.anomalous_fraction).toFixed(2)} %</p></div>`;
      div.querySelector("h3").textContent = x.file;
    }
    out.appendChild(div);
  }
}
</script>
</body></html>
"""
