"""``shardmesh generate``: stream tokens from a router as they are produced."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from services.client import AsyncRouterClient, GenerateResult, build_generate_request


async def _generate(args: argparse.Namespace) -> int:
    request = build_generate_request(
        text=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        mode=args.mode,
    )
    tls = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    async with AsyncRouterClient(args.router, **tls, token=args.token) as client:  # token None = $SHARDMESH_TOKEN
        async for event in client.generate_stream(request, args.timeout_s):
            if event.HasField("token"):
                if not args.json:
                    sys.stdout.write(event.token.text)
                    sys.stdout.flush()
                continue
            result = GenerateResult.from_proto(event.summary)
            if args.json:
                print(json.dumps(result.to_json()), flush=True)
            else:
                print(
                    f"\n[{len(result.token_ids)} tokens, ttft {result.ttft_ms:.0f} ms, "
                    f"{result.tokens_per_s:.1f} tokens/s, route {' -> '.join(result.route)}, "
                    f"{result.finish_reason}]",
                    file=sys.stderr,
                    flush=True,
                )
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args))
