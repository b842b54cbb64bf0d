"""Stopping a forward pass between layers.

A worker runs one compute at a time, so a request whose caller went away (or whose deadline passed)
would otherwise hold the compute thread, and the memory of its activations, until its last layer.
The engine marks the request's :class:`Interrupt` and the stage loops call :func:`checkpoint` before
each layer: the compute stops within about one layer's time and the thread is free for the next one.

The interrupt of the compute running now is a thread-local, set by :func:`interruptible`, so stage code
needs no extra parameter and code that runs a stage outside a worker (tests, the reference) is unaffected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from services.errors import Cancelled, DeadlineExceeded


class Interrupt:
    """Set from the event loop (:meth:`cancel`) or by the clock (``deadline``); checked in the compute thread."""

    def __init__(self, deadline: float | None = None, worker_id: str = "") -> None:
        self.deadline = deadline  # time.monotonic() instant, or None
        self.worker_id = worker_id
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raises Cancelled or DeadlineExceeded if the compute should stop now."""
        where = f" at hop {self.worker_id}" if self.worker_id else ""
        if self._cancelled.is_set():
            raise Cancelled(f"request cancelled by its caller; compute{where} stopped between layers")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(
                f"deadline exceeded during compute{where}; stopped between layers", failed_worker_id=self.worker_id
            )


_current = threading.local()


@contextmanager
def interruptible(interrupt: Interrupt | None) -> Iterator[None]:
    """Makes ``interrupt`` the one :func:`checkpoint` checks in this thread, for the duration of the block."""
    previous = getattr(_current, "interrupt", None)
    _current.interrupt = interrupt
    try:
        yield
    finally:
        _current.interrupt = previous


def checkpoint() -> None:
    """Called between layers: raises if this thread's current compute was cancelled or ran out of time."""
    interrupt: Interrupt | None = getattr(_current, "interrupt", None)
    if interrupt is not None:
        interrupt.check()
