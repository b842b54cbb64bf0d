"""``shardmesh bench generate``: sharded generation beside transformers' ``generate`` in one process.

Measured on the same prompts: time to first token and tokens/s for one session, aggregate tokens/s
for N concurrent sessions (continuous batching on the workers) as a ratio to one session, the time to
first token of a second session that shares a 200-token prompt prefix with the first (automatic prefix
caching on the workers) against the first's, and the pause a failover causes when a worker dies
mid-generation, set against the time to replay the prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from services.bench.machine import describe_machine
from services.client import AsyncRouterClient, build_generate_request
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import parse_spec
from services.models.registry import resolve_model

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "A service mesh routes requests between",
)


def _single_process(model_name: str, new_tokens: int, sessions: int) -> dict[str, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    source = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.model_dir))
    model = LlamaForCausalLM.from_pretrained(str(source.model_dir), torch_dtype=torch.float32).eval()
    ttfts, rates = [], []
    with torch.inference_mode():
        model.generate(torch.tensor([tokenizer(PROMPTS[0])["input_ids"]]), max_new_tokens=4, do_sample=False)  # warm-up
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            ttfts.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
        # N sessions one after another: one process serves them back to back.
        t0 = time.perf_counter()
        total = 0
        for i in range(sessions):
            ids = torch.tensor([tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]])
            total += model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False).shape[1] - ids.shape[1]
        aggregate = total / (time.perf_counter() - t0)
    return {
        "system": "single (transformers generate)",
        "ttft_ms": statistics.median(ttfts),
        "tokens_per_s_1": statistics.median(rates),
        f"tokens_per_s_{sessions}": aggregate,
    }


async def _one(client: AsyncRouterClient, prompt: str, new_tokens: int, mode: str) -> tuple[float, float, int]:
    request = build_generate_request(text=prompt, max_new_tokens=new_tokens, mode=mode)
    t0 = time.perf_counter()
    first = None
    count = 0
    async for event in client.generate_stream(request, 600):
        if event.HasField("token"):
            count += 1
            if first is None:
                first = time.perf_counter() - t0
    return 1000 * (first or 0.0), count / (time.perf_counter() - t0), count


PREFIX_TOKENS = 200
PREFIX_TEXT = (
    "You are a careful assistant for a service mesh team. Answer briefly, cite the component you mean, "
    "and say when you are unsure. The mesh has a router, shard workers and a discovery service. "
)
QUESTIONS = ("What does the router do?", "How are workers found?", "Why split a model?", "What is a shard?")


def shared_prefix_prompts(model_name: str, rounds: int) -> list[tuple[list[int], list[int]]]:
    """Per round, two prompts that share their first PREFIX_TOKENS token ids (a fresh prefix each round)."""
    from services.models.registry import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(model_name))
    base, _ = tokenizer.encode(PREFIX_TEXT * 12)
    pairs = []
    for r in range(rounds):
        prefix = list(base[7 * r : 7 * r + PREFIX_TOKENS])  # a different 200-token window each round
        first, second = (list(tokenizer.encode(q)[0]) for q in (QUESTIONS[(2 * r) % 4], QUESTIONS[(2 * r + 1) % 4]))
        pairs.append((prefix + first, prefix + second))
    return pairs


async def _ttft(client: AsyncRouterClient, ids: list[int], mode: str) -> float:
    request = build_generate_request(tokens=ids, max_new_tokens=1, mode=mode)
    t0 = time.perf_counter()
    async for event in client.generate_stream(request, 600):
        if event.HasField("token"):
            return 1000 * (time.perf_counter() - t0)
    return 0.0


async def _mesh(
    model_name: str, mode: str, new_tokens: int, sessions: int, split: list[str], worker_args: list[str] | None = None
) -> dict[str, Any]:
    spec = parse_spec({"model": model_name, "mode": mode, "workers": [{"layers": s} for s in split],
                       "worker_args": list(worker_args or []), "router_args": ["--hop-timeout-ms", "60000"]})
    async with LocalMesh(spec) as mesh, AsyncRouterClient(mesh.router_address) as client:
        await _one(client, PROMPTS[0], 4, mode)  # warm-up
        results = [await _one(client, p, new_tokens, mode) for p in PROMPTS]
        t0 = time.perf_counter()
        many = await asyncio.gather(*(_one(client, PROMPTS[i % len(PROMPTS)], new_tokens, mode) for i in range(sessions)))
        aggregate = sum(c for _, _, c in many) / (time.perf_counter() - t0)
        # Shared prefix: the second session's prompt starts with the first's 200 tokens (other question).
        cold, warm = [], []
        for first, second in shared_prefix_prompts(model_name, 3):
            cold.append(await _ttft(client, first, mode))
            warm.append(await _ttft(client, second, mode))
    return {
        "system": f"mesh-{mode}" + ("" if not worker_args else " " + " ".join(worker_args)),
        "ttft_ms": statistics.median(r[0] for r in results),
        "tokens_per_s_1": statistics.median(r[1] for r in results),
        f"tokens_per_s_{sessions}": aggregate,
        "prefix_tokens": PREFIX_TOKENS,
        "shared_prefix_ttft_first_ms": statistics.median(cold),
        "shared_prefix_ttft_second_ms": statistics.median(warm),
        "shared_prefix_ttft_ratio": statistics.median(cold) / max(statistics.median(warm), 1e-9),
    }


async def _failover_pause(model_name: str, new_tokens: int, split: list[str]) -> dict[str, Any]:
    """Kills the stage-1 replica a session uses after a few tokens; the longest gap between tokens is the pause."""
    workers = [{"layers": s} for s in split]
    workers[1]["replicas"] = 2  # type: ignore[assignment]
    spec = parse_spec({"model": model_name, "workers": workers})
    async with LocalMesh(spec) as mesh, AsyncRouterClient(mesh.router_address) as client:
        await _one(client, PROMPTS[0], 4, "direct")
        from services.gen.shardmesh.v1 import worker_pb2, worker_pb2_grpc
        from services.net import open_channel

        request = build_generate_request(text=PROMPTS[1], max_new_tokens=new_tokens)
        stamps: list[float] = []
        killed_at = None
        prefix_tokens = 0
        async for event in client.generate_stream(request, 600):
            if event.HasField("summary"):
                summary = event.summary
                break
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens // 2 and killed_at is None:
                for child in mesh.workers:
                    if child.name.startswith("w1r"):
                        async with open_channel(child.address) as channel:
                            reply = await worker_pb2_grpc.ShardWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)
                        if reply.capacity.sessions:
                            os.kill(child.pid, signal.SIGKILL)
                            killed_at = time.perf_counter()
                            prefix_tokens = len(stamps)
                            break
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        pause_ms = 1000 * max(gaps) if gaps else 0.0
        normal_ms = 1000 * statistics.median(gaps) if gaps else 0.0
        # Replaying the prefix: the prompt plus the tokens so far, run as the same steps on a fresh route.
        replay_t0 = time.perf_counter()
        await _one(client, PROMPTS[1], prefix_tokens, "direct")
        replay_ms = 1000 * (time.perf_counter() - replay_t0)
    return {
        "failovers": summary.failovers,
        "pause_ms": pause_ms,
        "normal_token_gap_ms": normal_ms,
        "replay_prefix_ms": replay_ms,
        "pause_target_ms": replay_ms + 200,
    }


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    model_name = "tiny-llama" if args.quick else "smollm2"
    new_tokens = 8 if args.quick else 32
    sessions = 2 if args.quick else 8
    total = resolve_model(model_name).total_layers
    split = [f"0:{total // 3}", f"{total // 3}:{2 * total // 3}", f"{2 * total // 3}:{total}"]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"generate bench: {model_name}, {new_tokens} new tokens, {sessions} concurrent sessions, split {split}", flush=True)
    rows = [_single_process(model_name, new_tokens, sessions)]
    for mode in ("direct", "relay"):
        rows.append(asyncio.run(_mesh(model_name, mode, new_tokens, sessions, split)))
    single = rows[0]
    for row in rows:
        row["model"] = model_name
        row["ratio_tokens_per_s_1"] = row["tokens_per_s_1"] / single["tokens_per_s_1"]
        row[f"scaling_{sessions}_vs_1"] = row[f"tokens_per_s_{sessions}"] / row["tokens_per_s_1"]
    failover = asyncio.run(_failover_pause(model_name, new_tokens, split))
    for row in rows:
        print(
            f"{row['system']:32s} ttft {row['ttft_ms']:7.1f} ms  1 session {row['tokens_per_s_1']:6.1f} tok/s "
            f"({row['ratio_tokens_per_s_1']:.2f}x single)  {sessions} sessions {row[f'tokens_per_s_{sessions}']:6.1f} tok/s "
            f"({row[f'scaling_{sessions}_vs_1']:.2f}x its 1-session rate)"
        )
        if "shared_prefix_ttft_ratio" in row:
            print(
                f"{'':32s} {row['prefix_tokens']}-token shared prefix: TTFT first session "
                f"{row['shared_prefix_ttft_first_ms']:.0f} ms, second {row['shared_prefix_ttft_second_ms']:.0f} ms "
                f"({row['shared_prefix_ttft_ratio']:.1f}x lower; target 3x)"
            )
    print(
        f"failover: pause {failover['pause_ms']:.0f} ms (normal gap {failover['normal_token_gap_ms']:.0f} ms); "
        f"replaying the prefix takes {failover['replay_prefix_ms']:.0f} ms; target < {failover['pause_target_ms']:.0f} ms"
    )
    document = {
        "suite": "generate",
        "results": rows,
        "failover": failover,
        "machine": describe_machine(),
        "settings": {"model": model_name, "new_tokens": new_tokens, "sessions": sessions, "split": split},
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n")
    return 0
