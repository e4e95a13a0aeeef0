"""A bounded load run against `cavga serve` on 127.0.0.1, beside the offline batch rate.

    python scripts/serve_load.py RUN [--clients 8] [--seconds 60] [--pictures]

Starts `cavga serve RUN` in a subprocess, then `--clients` concurrent clients each post one test
image per request for `--seconds`. Prints p50/p95 latency, throughput, errors, and the server's
resident memory at start and end; then the offline rate of the same model (`predict_batch` on
batches of the run's batch size, in this process) for comparison.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from cavga import load_run


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--pictures", action="store_true", help="ask for the map and overlay PNGs too")
    args = p.parse_args()
    predictor = load_run(args.run, device="cpu")
    size = predictor.image_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    mode = "L" if predictor.channels == 1 else "RGB"
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    image = buf.getvalue()

    serve = [sys.executable, "-m", "cavga", "serve", args.run, "--port", str(args.port), "--device", "cpu"]
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        query = "" if args.pictures else "?images=false"
        with httpx.Client() as warm:
            for _ in range(3):
                warm.post(f"{url}/predict{query}", files={"file": ("x.png", image, "image/png")})
        rss_start = rss_mb(server.pid)
        latencies: list[float] = []
        errors = [0]
        stop = time.perf_counter() + args.seconds
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/predict{query}", files={"file": ("x.png", image, "image/png")})
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        errors[0] += r.status_code != 200 or r.json()["results"][0]["error"] is not None

        samples: list[float] = []

        def monitor() -> None:  # the server's resident memory every 10 s, to see whether it levels off
            while time.perf_counter() < stop:
                samples.append(rss_mb(server.pid))
                time.sleep(10)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)] + [
            threading.Thread(target=monitor)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait()
    q = statistics.quantiles(latencies, n=20)
    served = len(latencies) / elapsed
    pils = [Image.open(io.BytesIO(image))] * predictor.batch_size
    predictor.predict_batch(pils)
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < 10:
        predictor.predict_batch(pils)
        n += len(pils)
    offline = n / (time.perf_counter() - t1)
    p50, p95 = statistics.median(latencies) * 1000, q[18] * 1000
    pictures = "on" if args.pictures else "off"
    print(f"{args.clients} clients for {elapsed:.0f} s, {size} px, pictures {pictures}: "
          f"{len(latencies)} requests, {errors[0]} errors; latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; "
          f"throughput {served:.1f} images/s; server RSS {rss_start:.0f} MB at start, "
          f"{rss_end:.0f} MB at end; every 10 s: {', '.join(f'{v:.0f}' for v in samples)} MB")  # fmt: skip
    print(f"offline predict_batch (batch {predictor.batch_size}): {offline:.1f} images/s; "
          f"served / offline = {served / offline:.2f}")  # fmt: skip
    return 0 if errors[0] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
