"""Router-side coalescing (--coalesce) through real processes: requests that wait for the pipeline travel as
one batch per hop (hop records count the batch), in direct and relay mode, each client still gets the output
of its own text within the batching bound; a client that leaves does not disturb the rest of its batch."""

from __future__ import annotations

import asyncio

import pytest

from services.client import AsyncRouterClient
from services.errors import ShardmeshError
from services.models.registry import resolve_model
from tests.procs import mesh_up

pytestmark = [pytest.mark.integration]

BOUND = 1e-5  # docs/architecture.md "Dynamic batching": a batched forward vs solo, minilm
# Equal token counts (8 each), so all of them may share one batch; different words, so a mixed-up row shows.
TEXTS = [f"the {w} sat on the mat" for w in ("cat", "dog", "cow", "man", "boy", "car", "sun", "sky", "bird")]


@pytest.fixture(scope="module")
def sentence_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")


async def _infer_all(router: str, mode: str, cancel: int | None = None) -> list[object]:
    async with AsyncRouterClient(router) as client:
        await client.wait_ready(120)
        tasks = [asyncio.create_task(client.infer(text=t, timeout_s=120, mode=mode)) for t in TEXTS]
        if cancel is not None:
            await asyncio.sleep(0.02)  # sent; the first goes alone, the rest wait for it
            tasks[cancel].cancel()
        return list(await asyncio.gather(*tasks, return_exceptions=True))


def test_waiting_requests_share_one_message_per_hop_and_each_gets_its_own_output(sentence_model) -> None:  # type: ignore[no-untyped-def]
    config = {
        "model": "minilm",
        "workers": [{"layers": s} for s in ("0:2", "2:4", "4:6")],
        # one batch in flight: whatever arrives while it runs waits and leaves together (up to 4)
        "router_args": ["--coalesce", "4", "--coalesce-depth", "1"],
    }
    with mesh_up(config) as mesh:
        by_mode = {mode: asyncio.run(_infer_all(mesh.router, mode)) for mode in ("direct", "relay")}
        with_a_leaver = asyncio.run(_infer_all(mesh.router, "direct", cancel=len(TEXTS) - 1))
    expected = [sentence_model.encode(t, convert_to_tensor=True) for t in TEXTS]
    for mode, results in by_mode.items():
        for text, want, result in zip(TEXTS, expected, results, strict=True):
            assert not isinstance(result, BaseException), (mode, text, result)
            got = result.output.reshape(want.shape)  # type: ignore[attr-defined]
            assert (got - want).abs().max().item() <= BOUND, (mode, text)
            assert [h.layers.start for h in result.hops] == [0, 2, 4]  # type: ignore[attr-defined]
        sizes = [r.hops[0].batch_size for r in results]  # type: ignore[attr-defined]
        assert max(sizes) > 1, f"{mode}: nothing was coalesced: {sizes}"
        assert all(1 <= s <= 4 for s in sizes), sizes  # the router's --coalesce bound (workers do not batch)
    # The last client left while waiting (or while its batch ran): everyone else is served, correctly.
    assert isinstance(with_a_leaver[-1], (asyncio.CancelledError, ShardmeshError)), with_a_leaver[-1]
    for want, result in zip(expected[:-1], with_a_leaver[:-1], strict=True):
        assert not isinstance(result, BaseException), result
        assert (result.output.reshape(want.shape) - want).abs().max().item() <= BOUND  # type: ignore[attr-defined]
