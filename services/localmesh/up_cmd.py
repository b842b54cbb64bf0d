"""``shardmesh up CONFIG.yaml``: run a local mesh until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from services.localmesh.launcher import ChildFailed, LocalMesh
from services.localmesh.spec import load_spec


async def _up(config_path: str) -> int:
    spec = load_spec(config_path)
    mesh = LocalMesh(spec, echo_stderr=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.create_task(mesh.start())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        await mesh.stop()
        return 0
    stopper.cancel()
    try:
        address = start.result()
    except ChildFailed as exc:
        print(f"shardmesh up: error: {exc}", file=sys.stderr, flush=True)
        return 1
    for child in mesh.workers:
        print(f"worker name={child.name} pid={child.pid} address={child.address}", flush=True)
    print(mesh.security_line(), flush=True)
    print(f"ready router={address}", flush=True)
    await stop.wait()
    codes = await mesh.stop()
    bad = {name: code for name, code in codes.items() if code not in (0, None)}
    if bad:
        print(f"shardmesh up: children exited with errors: {bad}", file=sys.stderr, flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_up(args.config))
