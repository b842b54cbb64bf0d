"""``shardmesh infer``: send each TEXT to the router; print results (``--json``: one object per line)."""

from __future__ import annotations

import argparse
import json

from services.client import RouterClient


def run(args: argparse.Namespace) -> int:
    # token None = $SHARDMESH_TOKEN (read by the client)
    with RouterClient(args.router, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=args.token) as client:
        for text in args.text:
            result = client.infer(text=text, mode=args.mode, timeout_s=args.timeout_s)
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
            else:
                vec = result.output.flatten()
                head = ", ".join(f"{v:.4f}" for v in vec[:6].tolist())
                hops = " ".join(f"{wid}:{ms:.1f}ms" for wid, ms in zip(result.route, result.hops_ms))
                print(f"{text!r}: [{head}, ...] ({vec.numel()} values) mode={result.mode} route: {hops}", flush=True)
    return 0
