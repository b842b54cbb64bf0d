"""Batched prefills through real worker processes: sessions opened at the same moment (their prefills
run as one padded forward pass on each worker, their decode steps batched too) each generate exactly
the tokens transformers' ``generate`` gives that prompt alone, in direct and relay mode."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.client import AsyncRouterClient
from services.models.registry import resolve_model
from tests.procs import mesh_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "tiny-llama"
# Lengths 3..61 (six sessions), no two sharing a 16-token block: every prefill is a real one (no prefix-cache hit).
PROMPTS = [[1, *((31 * i + 7 * j) % 480 + 5 for j in range(n))] for i, n in enumerate((2, 9, 17, 30, 33, 60))]


def _reference(prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(resolve_model(MODEL).model_dir), torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_concurrent_sessions_generate_what_each_prompt_generates_alone() -> None:
    expected = [_reference(p, 10) for p in PROMPTS]
    config = {"model": MODEL, "workers": [{"layers": s} for s in ("0:2", "2:4", "4:6")],
              "worker_args": ["--no-prefix-cache", "--threads", "1"], "router_args": ["--hop-timeout-ms", "60000"]}

    async def run_all(router: str, mode: str) -> list[list[int]]:
        async with AsyncRouterClient(router) as client:
            results = await asyncio.gather(
                *(client.generate(tokens=p, max_new_tokens=10, mode=mode) for p in PROMPTS)
            )
        return [list(r.token_ids) for r in results]

    with mesh_up(config, timeout_s=600) as mesh:
        for mode in ("direct", "relay"):
            assert asyncio.run(run_all(mesh.router, mode)) == expected, mode
