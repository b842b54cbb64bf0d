"""Runs the emulator standalone: ``python -m tests.consul_emulator --port 0``.

Prints one line, ``consul-emulator-ready http=HOST:PORT control=HOST:PORT pid=N``, once both ports
listen, then serves until SIGTERM or SIGINT. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tests.consul_emulator.server import READY_PREFIX, ConsulEmulator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.consul_emulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="listen address; also the node's address")
    p.add_argument("--port", type=int, default=8500, help="HTTP API port (0 = pick a free one)")
    p.add_argument("--control-port", type=int, default=0, help="port of the /_emulator/ controls (0 = free)")
    p.add_argument("--node-name", default="consul-emulator")
    p.add_argument("--reap-interval", type=float, default=30.0,
                   help="seconds between reaper passes (real Consul: 30)")
    p.add_argument("--min-deregister-after", type=float, default=60.0,
                   help="floor for DeregisterCriticalServiceAfter, seconds (real Consul: 60)")
    p.add_argument("--min-check-interval", type=float, default=1.0,
                   help="floor for active check intervals, seconds (real Consul: 1)")
    p.add_argument("--blocking-backend", choices=["streaming", "rpc"], default="streaming",
                   help="streaming: a client agent (Consul >= 1.10 default); rpc: a server agent or streaming off")
    p.add_argument("--strip-index", action="store_true", help="drop X-Consul-Index from answers, as some proxies do")
    p.add_argument("--acl-default-policy", choices=["allow", "deny"],
                   help="enable ACLs with this default policy (off when not given: tokens are ignored)")
    p.add_argument("--acl-initial-management", metavar="TOKEN",
                   help="secret of the initial management token (acl.tokens.initial_management)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emulator = ConsulEmulator(
        args.host, args.port, args.control_port, node_name=args.node_name, reap_interval_s=args.reap_interval,
        min_deregister_after_s=args.min_deregister_after, min_check_interval_s=args.min_check_interval,
        blocking_backend=args.blocking_backend, strip_index=args.strip_index,
        acl_default_policy=args.acl_default_policy, acl_management_token=args.acl_initial_management,
    )
    await emulator.start()
    try:
        print(f"{READY_PREFIX} http={args.host}:{emulator.port} control={args.host}:{emulator.control_port} "
              f"pid={os.getpid()}", flush=True)
        await stop.wait()
    finally:
        await emulator.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s consul-emulator %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
