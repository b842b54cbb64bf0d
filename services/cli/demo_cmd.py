"""``shardmesh demo``: a real model through a local 3-worker mesh, side by side with the single-process model.

Exit status 0 only if every mesh output equals the single-process reference (sentence-transformers'
own ``encode`` for minilm) exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch

from services.client import AsyncRouterClient
from services.localmesh.launcher import LocalMesh
from services.localmesh.spec import MeshSpec, WorkerSpec
from services.layers import LayerSpan

T = TypeVar("T")

SAMPLES = (
    "A service mesh routes requests between services.",
    "The router sends activations through three shard workers.",
    "Consul tells the router which workers are alive.",
    "Sharded inference must match the single-process model exactly.",
)
DEMO_SPLIT = ("0:2", "2:4", "4:6")


class ProgressPrinter:
    """Prints start-up progress: one line per state change, with elapsed time (readable in logs and TTYs)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._state: dict[str, str] = {}
        self._spinner = "|/-\\"
        self._ticks = 0

    def __call__(self, name: str, event: str) -> None:
        if event == "loading":
            self._ticks += 1
            if sys.stdout.isatty():
                sys.stdout.write(f"\r  {self._spinner[self._ticks % 4]} loading weights ... {self._elapsed()}")
                sys.stdout.flush()
            if self._state.get(name) == "loading":
                return
        if sys.stdout.isatty():
            sys.stdout.write("\r")
        self._state[name] = event
        print(f"  [{self._elapsed()}] {name}: {event}", flush=True)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._t0:5.1f}s"


def _local_spec(model: str, split: tuple[str, ...], mode: str) -> MeshSpec:
    workers = tuple(WorkerSpec(f"worker-{i}", LayerSpan.parse(s), "127.0.0.1:0") for i, s in enumerate(split))
    return MeshSpec(model=model, router_listen="127.0.0.1:0", workers=workers, mode=mode)


@contextlib.asynccontextmanager
async def _mesh_beside_reference(spec: MeshSpec, load_reference: Callable[[], T]) -> AsyncIterator[tuple[str, T]]:
    """Starts the mesh and loads the single-process reference in parallel; always stops the mesh."""
    mesh = LocalMesh(spec, progress=ProgressPrinter())
    reference_task = asyncio.create_task(asyncio.to_thread(load_reference))
    try:
        address = await mesh.start()
        reference = await reference_task
        print(mesh.security_line())
        print(f"ready: router at {address}\n")
        yield address, reference
    finally:
        if not reference_task.done():
            reference_task.cancel()
        codes = await mesh.stop()
        print(f"stopped the mesh (exit codes: {codes})")


def _reference(model_dir: str) -> object:
    from sentence_transformers import SentenceTransformer  # heavy: imported only for the demo

    return SentenceTransformer(model_dir, device="cpu")


async def _demo(args: argparse.Namespace) -> int:
    from services.models.registry import resolve_model

    if args.generate:
        return await _demo_generate(args)
    source = resolve_model(args.model)
    if source.architecture != "bert":
        print(f"shardmesh demo: the demo compares with sentence-transformers; use a bert model, not {args.model}", file=sys.stderr)
        return 2
    spec = _local_spec(args.model, DEMO_SPLIT, args.mode)
    print(f"shardmesh demo: {source.model_id} ({source.total_layers} layers) split {', '.join(DEMO_SPLIT)} over 3 workers")
    print("starting the mesh (router + 3 worker processes) and the single-process reference ...")
    all_match = True
    async with _mesh_beside_reference(spec, lambda: _reference(str(source.model_dir))) as (address, reference):
        async with AsyncRouterClient(address) as client:
            for text in SAMPLES:
                t0 = time.perf_counter()
                ref = reference.encode(text, convert_to_tensor=True)  # type: ignore[attr-defined]
                ref_ms = 1000 * (time.perf_counter() - t0)
                t0 = time.perf_counter()
                result = await client.infer(text=text, timeout_s=60)
                mesh_ms = 1000 * (time.perf_counter() - t0)
                out = result.output.reshape(ref.shape)
                diff = float((out - ref).abs().max())
                match = torch.equal(out, ref)
                all_match &= match
                print(f"{text!r}")
                print(f"  mesh      {_head(out)}  {mesh_ms:6.1f} ms  route {' -> '.join(result.route)} ({result.mode})")
                print(f"  reference {_head(ref)}  {ref_ms:6.1f} ms  (sentence-transformers, one process)")
                print(f"  max |diff| = {diff:.3g}  {'MATCH (bit-identical)' if match else 'MISMATCH'}\n")
    print("all outputs match the single-process model" if all_match else "some outputs differ from the reference")
    return 0 if all_match else 1


GENERATE_PROMPTS = ("The capital of France is", "A service mesh is")
GENERATE_SPLIT = ("0:10", "10:20", "20:30")


async def _demo_generate(args: argparse.Namespace) -> int:
    """SmolLM2 split over 3 workers, tokens streamed, compared with transformers' generate in one process."""
    from services.client import build_generate_request
    from services.models.registry import resolve_model

    model_name = "smollm2" if args.model == "minilm" else args.model
    print(f"shardmesh demo --generate: {model_name} split {', '.join(GENERATE_SPLIT)} over 3 workers")
    print("preparing the model (converted once from the bundled GGUF, then cached) ...", flush=True)
    source = await asyncio.to_thread(resolve_model, model_name)
    spec = _local_spec(model_name, GENERATE_SPLIT, args.mode)
    all_match = True
    load = lambda: _llama_reference(str(source.model_dir))  # noqa: E731
    async with _mesh_beside_reference(spec, load) as (address, (model, tokenizer)):
        async with AsyncRouterClient(address) as client:
            for prompt in GENERATE_PROMPTS:
                print(f"{prompt!r}\n  mesh      ", end="", flush=True)
                tokens: list[int] = []
                summary = None
                async for event in client.generate_stream(build_generate_request(text=prompt, max_new_tokens=20), 300):
                    if event.HasField("token"):
                        tokens.append(event.token.token_id)
                        print(event.token.text, end="", flush=True)
                    else:
                        summary = event.summary
                ids = tokenizer(prompt)["input_ids"]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
                ref_s = time.perf_counter() - t0
                match = tokens == ref
                all_match &= match
                assert summary is not None
                print(f"\n  reference {tokenizer.decode(ref, skip_special_tokens=True)}")
                print(
                    f"  mesh: {summary.tokens_per_s:.1f} tokens/s, first token {summary.ttft_ms:.0f} ms, route "
                    f"{' -> '.join(summary.route)}; reference: {len(ref) / ref_s:.1f} tokens/s; "
                    f"{'MATCH (identical tokens)' if match else 'MISMATCH'}\n"
                )
    print("all generations match the single-process model" if all_match else "some generations differ")
    return 0 if all_match else 1


def _llama_reference(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


def _head(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.5f}" for v in t.flatten()[:4].tolist()) + ", ...]"


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))
