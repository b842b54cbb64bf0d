"""Session KV caches: byte budget, TTL, close, and refusal of a step at the wrong position (Petals #587).

Store tests fill caches with tensors of known size; stage tests use tiny-llama so the cache really
holds a stage's keys and values.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from services.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.layers import LayerSpan
from services.models.base import ModelSource
from services.models.kv_cache import MIB, SessionCache, SessionCacheStore, kv_bytes_per_token
from services.models.llama import LlamaStage
from services.models.registry import load_stage, resolve_model

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64
PER_TOKEN = kv_bytes_per_token(LAYERS, KV_HEADS, HEAD_DIM, torch.float32)  # 2048 bytes


def fill(session: SessionCache, tokens: int) -> None:
    """Appends ``tokens`` tokens of keys and values to every layer, as a stage step would."""
    for layer in range(LAYERS):
        shape = (1, KV_HEADS, tokens, HEAD_DIM)
        session.cache.update(torch.zeros(shape), torch.zeros(shape), layer)
    session.advance(tokens)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve_model("tiny-llama", cache_dir=tmp_path_factory.mktemp("cache"))


def llama_stage(source: ModelSource, span: str) -> LlamaStage:
    stage = load_stage(source, LayerSpan.parse(span))
    assert isinstance(stage, LlamaStage)
    return stage


# --- store ------------------------------------------------------------------------------------------


def test_bytes_are_measured_from_the_cached_tensors() -> None:
    assert PER_TOKEN == 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    a, b = store.open("a", ttl_s=60, now=0), store.open("b", ttl_s=60, now=0)
    assert (store.count, store.bytes_used) == (2, 0)
    fill(a, 10)
    fill(b, 3)
    fill(b, 4)
    assert a.nbytes == 10 * PER_TOKEN and b.nbytes == 7 * PER_TOKEN
    assert store.bytes_used == 17 * PER_TOKEN
    assert (a.position, b.position) == (10, 7)


def test_growth_beyond_the_budget_is_resource_exhausted_with_the_numbers() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)  # room for 512 tokens
    for name in "abc":
        fill(store.open(name, ttl_s=60, now=0), 160)  # 3 x 160 tokens = 0.94 MiB
    store.prepare_step("c", position=160, new_tokens=32, now=1)  # exactly full is allowed
    with pytest.raises(
        ResourceExhausted,
        match=r"cache budget 1 MiB full: 3 sessions use 0\.94 MiB; "
        r"session 'c' growing by 33 tokens needs 0\.06 MiB more",
    ):
        store.prepare_step("c", position=160, new_tokens=33, now=1)
    with pytest.raises(ResourceExhausted, match=r"3 sessions use 0\.94 MiB; a new session of 40 tokens needs"):
        store.open("d", ttl_s=60, now=1, reserve_tokens=40)
    assert store.count == 3  # the refused session was not created


def test_message_reads_in_whole_mib_for_real_budgets() -> None:
    store = SessionCacheStore(budget_bytes=512 * MIB, bytes_per_token=1 << 16)
    for i in range(12):  # 12 x 42.5 MiB, never written: torch.empty commits no pages
        layer = DynamicLayer()
        layer.keys, layer.values = torch.empty(1, 1, 1024, 5440), torch.empty(1, 1, 1024, 5440)
        layer.is_initialized = True
        session = store.open(f"s{i}", ttl_s=60, now=0, reserve_tokens=0)
        session.cache.layers.append(layer)
        session.advance(1024)
    assert store.bytes_used == 510 * MIB
    full = r"^cache budget 512 MiB full: 12 sessions use 510 MiB; .* needs 4 MiB more"
    with pytest.raises(ResourceExhausted, match=full):
        store.prepare_step("s0", position=1024, new_tokens=64, now=0)


def test_close_frees_the_bytes() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    fill(store.open("a", ttl_s=60, now=0), 300)
    fill(store.open("b", ttl_s=60, now=0), 200)
    with pytest.raises(ResourceExhausted):
        store.open("c", ttl_s=60, now=0, reserve_tokens=100)
    assert store.close("a") is True
    assert (store.count, store.bytes_used) == (1, 200 * PER_TOKEN)
    store.open("c", ttl_s=60, now=0, reserve_tokens=100)
    assert store.close("a") is False  # closing twice is not an error
    with pytest.raises(NotFound, match="unknown session 'a'"):
        store.get("a", now=0)


def test_idle_sessions_expire_after_their_ttl() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    store.open("a", ttl_s=10, now=0)
    store.open("b", ttl_s=30, now=0)
    store.get("a", now=5)  # use restarts the idle timer: now expires at 15
    assert store.expire(now=14.9) == []
    assert store.expire(now=15) == ["a"]
    assert store.count == 1
    with pytest.raises(NotFound, match="unknown session 'a'.*expired"):
        store.prepare_step("a", position=0, new_tokens=1, now=16)
    # An expired session that expire() has not reaped yet is refused as well, and then gone.
    with pytest.raises(NotFound, match=r"session 'b' expired after 30 s idle"):
        store.get("b", now=30)
    assert store.count == 0


def test_reopening_an_empty_session_is_harmless_but_a_used_one_is_refused() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    first = store.open("a", ttl_s=10, now=0)
    assert store.open("a", ttl_s=10, now=1) is first  # a retried open
    fill(first, 5)
    with pytest.raises(FailedPrecondition, match="session 'a' is already open at position 5; close it first"):
        store.open("a", ttl_s=10, now=2)


def test_step_at_the_wrong_position_is_refused_naming_both_numbers() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    fill(store.open("a", ttl_s=10, now=0), 5)
    for wrong in (0, 4, 6):  # a fresh replacement at 0 (Petals #587), a replayed step, a skipped step
        with pytest.raises(FailedPrecondition, match=rf"step starts at position {wrong} but the cache holds 5 tokens"):
            store.prepare_step("a", position=wrong, new_tokens=1, now=1)
    assert store.prepare_step("a", position=5, new_tokens=1, now=1).position == 5


def test_a_session_belongs_to_the_key_it_was_opened_with() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    owned = store.open("a", ttl_s=10, now=0, key=b"secret-a")
    assert owned.owner and b"secret-a" not in owned.owner  # a digest is kept, not the key
    fill(owned, 3)
    denied = r"session 'a' belongs to another caller: the session key does not match"
    for stranger in (b"secret-b", b""):
        with pytest.raises(PermissionDenied, match=denied):
            store.prepare_step("a", position=3, new_tokens=1, now=1, key=stranger)
        with pytest.raises(PermissionDenied, match=denied):
            store.close("a", stranger)
        with pytest.raises(PermissionDenied, match=denied):  # nor take it over by re-opening it
            store.open("a", ttl_s=10, now=1, key=stranger)
    assert store.count == 1
    assert store.prepare_step("a", position=3, new_tokens=1, now=1, key=b"secret-a") is owned
    assert store.close("a", b"secret-a") and store.count == 0


def test_a_session_opened_without_a_key_takes_only_keyless_steps() -> None:
    store = SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN)
    fill(store.open("old", ttl_s=10, now=0), 2)
    with pytest.raises(PermissionDenied, match="session 'old' belongs to another caller"):
        store.prepare_step("old", position=2, new_tokens=1, now=1, key=b"k")
    with pytest.raises(PermissionDenied):
        store.close("old", b"k")
    assert store.prepare_step("old", position=2, new_tokens=1, now=1).position == 2
    assert store.close("old") and not store.close("old")


def test_invalid_store_arguments() -> None:
    with pytest.raises(InvalidArgument):
        SessionCacheStore(budget_bytes=0, bytes_per_token=PER_TOKEN)
    with pytest.raises(InvalidArgument, match="ttl"):
        SessionCacheStore(budget_bytes=MIB, bytes_per_token=PER_TOKEN).open("a", ttl_s=0, now=0)


# --- with a real stage ------------------------------------------------------------------------------


def test_stage_cache_bytes_match_the_admission_estimate(tiny_llama: ModelSource) -> None:
    stage = llama_stage(tiny_llama, "1:4")
    session = SessionCache("s")
    stage.step(torch.randn(1, 7, 64), session_cache=session, position=0)
    stage.step(torch.randn(1, 1, 64), session_cache=session, position=7)
    assert session.position == 8
    assert session.nbytes == 8 * stage.kv_bytes_per_token == 8 * kv_bytes_per_token(3, 2, 16, torch.float32)
    assert len(session.cache.layers) == 3  # only this stage's layers


def test_stage_refuses_a_step_at_the_wrong_position_and_keeps_the_cache(tiny_llama: ModelSource) -> None:
    stage = llama_stage(tiny_llama, "0:6")
    session = SessionCache("s")
    stage.step(torch.tensor([[1, 5, 9]]), session_cache=session, position=0)
    before = session.nbytes
    with pytest.raises(FailedPrecondition, match="step starts at position 0 but the cache holds 3 tokens"):
        stage.step(torch.tensor([[4]]), session_cache=session, position=0)
    with pytest.raises(FailedPrecondition, match="position 2 but the cache holds 3"):
        stage.step_batch([(torch.tensor([[4]]), session, 2), (torch.tensor([[4]]), SessionCache("t"), 0)])
    assert (session.position, session.nbytes) == (3, before)


def test_failed_step_rolls_the_cache_back_so_a_retry_is_exact(
    tiny_llama: ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = llama_stage(tiny_llama, "0:6")
    ids = torch.tensor([[1, 5, 9, 13]])
    clean, broken = SessionCache("clean"), SessionCache("broken")
    for session in (clean, broken):
        stage.step(ids[:, :3], session_cache=session, position=0)
    expected = stage.step(ids[:, 3:], session_cache=clean, position=3)

    layer: Any = stage.layers[4]

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("worker died mid-step")

    monkeypatch.setattr(layer, "forward", fail)
    with pytest.raises(RuntimeError, match="mid-step"):
        stage.step(ids[:, 3:], session_cache=broken, position=3)  # layers 0-3 had appended already
    assert broken.position == 3
    assert [k.shape[-2] for k, _ in broken.layer_kv()] == [3] * 6
    monkeypatch.undo()
    assert torch.equal(stage.step(ids[:, 3:], session_cache=broken, position=3), expected)


def test_step_beyond_the_context_window_is_invalid_argument(tiny_llama: ModelSource) -> None:
    stage = llama_stage(tiny_llama, "1:2")
    session = SessionCache("long", position=1020)
    with pytest.raises(InvalidArgument, match="would reach 1025 tokens; the model supports 1024"):
        stage.step(torch.randn(1, 5, 64), session_cache=session, position=1020)


def test_store_sized_from_a_stage_admits_what_the_budget_pays_for(tiny_llama: ModelSource) -> None:
    """A store sized from a real stage admits exactly as many tokens as its budget pays for."""
    stage = llama_stage(tiny_llama, "0:6")
    store = SessionCacheStore(budget_bytes=20 * stage.kv_bytes_per_token, bytes_per_token=stage.kv_bytes_per_token)
    session = store.prepare_step(store.open("s", ttl_s=5, now=0).session_id, position=0, new_tokens=20, now=0)
    stage.step(torch.arange(1, 21).unsqueeze(0), session_cache=session, position=0)
    assert store.bytes_used == store.budget_bytes
    with pytest.raises(ResourceExhausted, match="session 's' growing by 1 tokens"):
        store.prepare_step("s", position=20, new_tokens=1, now=1)
