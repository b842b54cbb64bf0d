"""Spawned helper processes with a deadline: every process is joined or killed before this returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

REAP_TIMEOUT_S = 10.0


def run_spawned(target: Callable[..., None], args: tuple[Any, ...], nprocs: int, budget_s: float) -> None:
    """Runs ``target(index, *args)`` in ``nprocs`` spawned processes (never fork) and waits for all.

    Raises if one fails (torch's ProcessContext then ends the others) or ``budget_s`` runs out; in every
    case the processes are terminated, then killed, before this returns.
    """
    context = mp.start_processes(target, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + budget_s
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawned processes did not finish within {budget_s:.0f}s")
    finally:
        _reap(context)


def _reap(context: mp.ProcessContext) -> None:
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(REAP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join(REAP_TIMEOUT_S)
