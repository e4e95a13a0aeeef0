"""Kill training with SIGKILL at random moments, rerun the same command line with --resume each
time, and check that the run ends with the same weights as an uninterrupted one.

    python scripts/kill_resume.py --kills 24 --out /tmp/kills

Both runs use the same process settings (one thread each), on the built-in demo data. The first
three kills land in the first 5 s (before the first checkpoint), the others uniformly in
[0.5, --max-delay] s of each attempt. Each
attempt is reported: when it was killed, the step of the checkpoint it left, and whether it died
while writing a checkpoint (a `checkpoint.pt.tmp` left behind).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from cavga.data import make_demo_data
from cavga.engine.run import CHECKPOINT


def checkpoint_step(run: Path) -> int | None:
    path = run / CHECKPOINT
    return torch.load(path, weights_only=True)["step"] if path.exists() else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="cavga-ru")
    p.add_argument("--max-delay", type=float, default=14.0, help="kills land uniformly in [0.5, this] s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    data = make_demo_data(args.out / "data", image_size=args.image_size, n_train=24, categories=("brick",))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "cavga", "train", "--data", str(data), "--model", args.model,
                "--image-size", str(args.image_size), "--steps", str(args.steps), "--batch-size", "8",
                "--checkpoint-every", "1", "--device", "cpu", "--quiet", "--out", str(run),
                "--resume"]  # fmt: skip

    ref, run = args.out / "uninterrupted", args.out / "killed"
    t0 = time.perf_counter()
    subprocess.run(command(ref), env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"uninterrupted run: {time.perf_counter() - t0:.1f} s for {args.steps} steps")
    rng = random.Random(args.seed)
    print("| attempt | killed after (s) | checkpoint step after | died writing a checkpoint | traceback |")
    print("|---|---|---|---|---|")
    attempt, tracebacks, kills, before_first, mid_writes, after_end = 0, 0, 0, 0, 0, 0
    while True:
        attempt += 1
        (run / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
        proc = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The first three kills land while Python and torch start (before any checkpoint).
        delay = rng.uniform(0.5, args.max_delay if attempt > 3 else 5.0) if attempt <= args.kills else None
        if delay is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        tracebacks += b"Traceback" in err
        mid_write = (run / (CHECKPOINT + ".tmp")).exists()
        died = proc.returncode == -signal.SIGKILL
        if died:
            kills += 1
            before_first += checkpoint_step(run) is None
            mid_writes += mid_write
        after_end += not died and delay is not None
        when = f"{delay:.1f}" if died else f"finished (rc {proc.returncode})"
        yes = {True: "yes", False: "no"}
        print(
            f"| {attempt} | {when} | {checkpoint_step(run)} | {yes[mid_write]} | {yes[b'Traceback' in err]} |"
        )
        if not died and delay is None:
            break
        if not died and checkpoint_step(run) == args.steps:
            # Finished before the kill: later attempts must leave the finished run as it is.
            continue
    print(
        f"\n{kills} attempts killed: {before_first} before the first checkpoint, {mid_writes} while writing "
        f"a checkpoint, {after_end} after the run had finished"
    )
    a = torch.load(ref / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(run / CHECKPOINT, weights_only=True)["model"]
    same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    print(f"\nfinal weights identical to the uninterrupted run: {same}; tracebacks: {tracebacks}")
    return 0 if same and tracebacks == 0 and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
