"""``shardmesh`` entry point: parse flags, then hand off to the subcommand's module.

Subcommand modules are imported lazily so ``shardmesh --help`` stays fast and a worker never imports
router code (and vice versa).
"""

from __future__ import annotations

import importlib
import os
import sys

from services.cli.parser import build_parser
from services.errors import ShardmeshError
from services.memory import reexec_for_fast_exit

# command -> "module:function"; each function takes the parsed argparse.Namespace and returns an exit code.
HANDLERS: dict[str, str] = {
    "worker": "shard_worker.main:run",
    "router": "router.main:run",
    "up": "services.localmesh.up_cmd:run",
    "infer": "services.cli.infer_cmd:run",
    "demo": "services.cli.demo_cmd:run",
    "bench": "services.bench.main:run",
    "generate": "services.cli.generate_cmd:run",
    "convert": "services.models.convert:run",
    "chaos": "services.cli.chaos_cmd:run",
    "plan": "services.cli.plan_cmd:run",
}


# Several shardmesh processes often share a machine's cores (a local mesh, co-located workers). OpenMP
# threads that spin while idle then starve the process doing the work: measured on 2 cores, minilm mesh
# p50 went from 37 ms to 344 ms. Servers therefore default to passive waiting; set OMP_WAIT_POLICY to override.
PASSIVE_OMP_COMMANDS = frozenset({"worker", "router"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "worker":
        reexec_for_fast_exit()  # a killed worker's peers notice 5x sooner (services/memory.py)
    if args.command in PASSIVE_OMP_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported by the handler
    module_name, func_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except ShardmeshError as exc:
        print(f"shardmesh {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
