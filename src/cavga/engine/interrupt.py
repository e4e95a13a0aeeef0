"""Ctrl-C during training stops at the next step boundary, so what is saved is a finished step.

Python raises `KeyboardInterrupt` between any two bytecodes: inside an optimiser's update, between
the discriminator's and the generator's step, or after the weights moved but before the step was
counted. A checkpoint written there holds a step that is half applied and labelled as not taken,
and its `--resume` no longer matches an uninterrupted run. `StopAtStepEnd` replaces the SIGINT
handler while a training loop runs: the first Ctrl-C only asks the loop to stop after the step in
progress (which the loop then saves); a second one stops at once, and the loop saves nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType

import torch

from cavga.engine.distributed import World


class StopAtStepEnd:
    """Context manager: `requested()` is true once Ctrl-C was pressed (on any rank).

    Outside the main thread (a service, a notebook's worker thread) no handler can be installed, and
    Ctrl-C keeps Python's behaviour: a `KeyboardInterrupt` wherever it lands. Where SIGINT is
    ignored, it stays ignored.
    """

    def __init__(self, what: str = "step") -> None:
        self.what = what
        self.pressed = False
        self._previous: object = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pressed:  # a second Ctrl-C: stop inside the step; the loop saves nothing
            raise KeyboardInterrupt
        self.pressed = True
        print(
            f"\nstopping after this {self.what} (press Ctrl-C again to stop at once, unsaved)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopAtStepEnd:
        # A process started with SIGINT ignored (a background job of a script, `nohup`) keeps it so.
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._previous = None

    def requested(self, world: World, device: torch.device) -> bool:
        """Whether to stop now, at a step boundary. With several ranks every rank must stop at the
        same step (a rank that went on would wait for the others forever), so the request is shared:
        one tiny all-reduce per step."""
        return world.any(self.pressed, device)
