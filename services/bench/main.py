"""``shardmesh bench SUITE``: the CLI handler. Suites are looked up in :data:`SUITES` and imported lazily.

Adding a suite: write ``services/bench/<suite>.py`` with ``run(args, environ) -> int`` and add one line
to :data:`SUITES`; the parser already accepts ``infer``, ``failover`` and ``generate``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping

# suite -> "module:function"; the function takes (args, environ) and returns an exit code.
SUITES: dict[str, str] = {
    "infer": "services.bench.infer:run",
    "failover": "services.bench.failover:run",
    "generate": "services.bench.generate:run",
    "placement": "services.bench.placement:run",  # planned vs even split on heterogeneous workers (docs/placement.md)
    "balance": "services.bench.balance:run",  # --balancer policies on one heterogeneous mesh
    "schedule": "services.bench.schedule:run",  # router scheduling policies (docs/scheduling.md)
}
NOT_IMPLEMENTED_EXIT = 2


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    target = SUITES.get(args.suite)
    if target is None:
        available = ", ".join(sorted(SUITES))
        print(f"shardmesh bench: suite {args.suite!r} is not implemented yet (available: {available})", file=sys.stderr)
        return NOT_IMPLEMENTED_EXIT
    module_name, func_name = target.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args, os.environ if environ is None else environ))
