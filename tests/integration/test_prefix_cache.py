"""Automatic prefix caching through real worker processes: sessions that share a prompt prefix generate
exactly what transformers' ``generate`` does, the cached blocks stay (counted in cache_used_bytes) after
the sessions closed, are evicted within --cache-budget-mb instead of refusing sessions, and
--no-prefix-cache keeps nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from services.client import RouterClient
from services.models.registry import resolve_model
from tests.procs import UpMesh, describe_all, mesh_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "tiny-llama"
SPLIT = ["0:2", "2:4", "4:6"]
SHARED = [1, *range(100, 147)]  # 48 tokens: three full blocks of 16
_model: list[object] = []


def _reference(prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import LlamaForCausalLM

    if not _model:
        _model.append(LlamaForCausalLM.from_pretrained(str(resolve_model(MODEL).model_dir), torch_dtype=torch.float32).eval())
    with torch.inference_mode():
        out = _model[0].generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)  # type: ignore[attr-defined]
    return out[0, len(prompt):].tolist()


def _capacity(mesh: UpMesh) -> dict[str, tuple[int, int, int]]:
    """Per worker: (open sessions, cache_used_bytes, cache_budget_bytes), once no session is open."""
    deadline = time.monotonic() + 20
    while True:
        replies = describe_all(mesh)
        caps = {n: (r.capacity.sessions, r.capacity.cache_used_bytes, r.capacity.cache_budget_bytes)  # type: ignore[attr-defined]
                for n, r in replies.items()}
        if not any(c[0] for c in caps.values()) or time.monotonic() > deadline:
            return caps
        time.sleep(0.1)


def _config(*worker_args: str) -> dict[str, object]:
    return {"model": MODEL, "workers": [{"layers": s} for s in SPLIT], "worker_args": ["--threads", "1", *worker_args],
            "router_args": ["--hop-timeout-ms", "60000"]}


@pytest.fixture(scope="module")
def mesh() -> Iterator[UpMesh]:
    with mesh_up(_config("--cache-budget-mb", "1"), timeout_s=600) as up:
        yield up


def test_sessions_sharing_a_prefix_generate_what_transformers_does(mesh: UpMesh) -> None:
    prompts = [
        SHARED + [7, 8, 9],
        SHARED + [400],  # same three blocks, another question
        [1, 100, 101, 102, 499, *range(105, 147), 400],  # one token differs inside the first block: no reuse
        SHARED[:40],  # a prefix of the cached prompt that ends inside block three
    ]
    with RouterClient(mesh.router) as client:
        for mode in ("direct", "relay"):
            for prompt in prompts:
                result = client.generate(tokens=prompt, max_new_tokens=12, mode=mode)
                assert list(result.token_ids) == _reference(prompt, 12), (mode, prompt)
    after = _capacity(mesh)
    # The sessions are gone, their prompt blocks are not: every stage holds the shared prefix's blocks
    # (later stages found them by the bytes the earlier stages returned), within the budget.
    for name, (sessions, used, budget) in after.items():
        assert sessions == 0, name
        assert 0 < used <= budget, (name, used, budget)
    # The same prompts again add no block on stage 0: its token-id blocks all matched. (A later stage may
    # add one: when a whole prompt is cached, the last position is recomputed alone, and its hidden bytes
    # can differ by rounding from the full prefill's, so the next stage caches that block anew.)
    with RouterClient(mesh.router) as client:
        for prompt in prompts:
            assert list(client.generate(tokens=prompt, max_new_tokens=2).token_ids) == _reference(prompt, 2)
    again = _capacity(mesh)
    assert again["w0"] == after["w0"]
    assert all(0 < used <= budget for _, used, budget in again.values())


def test_the_budget_evicts_cached_prefixes_instead_of_refusing_sessions(mesh: UpMesh) -> None:
    # Ten distinct 300-token prompts cache more blocks than 1 MiB holds on the first stage (and the
    # sessions themselves need room): older blocks are evicted, every generation succeeds.
    with RouterClient(mesh.router) as client:
        for i in range(10):
            prompt = [1, *((17 * i + j) % 500 + 2 for j in range(299))]
            result = client.generate(tokens=prompt, max_new_tokens=3)
            assert list(result.token_ids) == _reference(prompt, 3), i
    for name, (sessions, used, budget) in _capacity(mesh).items():
        assert sessions == 0 and 0 < used <= budget, (name, used, budget)


def test_no_prefix_cache_keeps_nothing_after_sessions_close() -> None:
    with mesh_up(_config("--no-prefix-cache"), timeout_s=600) as up, RouterClient(up.router) as client:
        for prompt in (SHARED + [7], SHARED + [8]):
            assert list(client.generate(tokens=prompt, max_new_tokens=4).token_ids) == _reference(prompt, 4)
        assert {n: c[:2] for n, c in _capacity(up).items()} == {n: (0, 0) for n in up.workers}
