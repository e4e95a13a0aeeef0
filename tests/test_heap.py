"""glibc's heap: freed activation-sized buffers held below small lasting tensors (the pattern of fitting
the normal states) stay resident until `release_free_memory` gives them back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cavga import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="needs Linux with glibc")

# Frees one 16 MB buffer (which raises glibc's mmap threshold above 4 MB, as training does), then
# allocates forty 4 MB buffers, each followed by a small tensor that stays, frees the large ones and
# prints how much of their 160 MB of resident memory went back to the system.
SCRIPT = """
import sys, torch
from cavga import heap

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

warm = torch.ones(4 * 2**20)
del warm
big, small = [], []
for _ in range(40):
    big.append(torch.ones(2**20))
    small.append(torch.ones(256))
before = rss_mb()
big.clear()
if sys.argv[1] == "release":
    heap.release_free_memory()
print(before - rss_mb())
"""


def _returned_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_freed_buffers_between_lasting_tensors_go_back_only_when_released():
    assert _returned_mb("keep") < 40
    assert _returned_mb("release") > 140
