"""Self-placement under Consul (``--layers auto``), with real worker processes, a real router and the Consul
emulator: workers joining one after another cover every layer; when the only holder of some layers leaves,
another worker moves to cover them again within 60 s, without an operator, once, and without flapping;
requests keep their answers (sentence-transformers' own ``encode``) before, during and after the move, and none
fails: requests that find layer 0 without a holder wait for the move (``--route-wait-s``) instead of failing."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from typing import Any

import pytest
import torch

from services.client import RouterClient
from services.discovery.registration import parse_worker_meta
from services.errors import ShardmeshError
from services.models.registry import resolve_model
from services.placement.costs import META_AUTO, META_SPEED
from tests.consul_fixtures import wait_until
from tests.procs import CLI, Proc, fields, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.consul]

# minilm: embeddings 45.5 MiB, each layer 6.8 MiB. 66 MiB holds the embeddings and 3 layers (or 9 later layers),
# so at most two workers hold layer 0 and in every placement of 3 workers some layer has a single holder.
MEMORY_MB = "66"
INTERVAL_S = "3"
TEXT = "Layers move, answers stay."


def _instances(consul_addr: str, service: str) -> dict[str, tuple[int, int]]:
    with urllib.request.urlopen(f"http://{consul_addr}/v1/health/service/{service}?passing=true", timeout=5) as reply:
        entries: list[dict[str, Any]] = json.loads(reply.read())
    spans = {}
    for e in entries:
        meta = parse_worker_meta(e["Service"]["Meta"])
        assert e["Service"]["Meta"][META_AUTO] == "1" and float(e["Service"]["Meta"][META_SPEED]) == 1.0
        spans[e["Service"]["ID"]] = (meta.layers.start, meta.layers.end)
    return spans


def _covered(spans: dict[str, tuple[int, int]], total: int = 6) -> bool:
    return all(any(a <= layer < b for a, b in spans.values()) for layer in range(total))


def _moves(workers: dict[str, Proc]) -> dict[str, int]:
    return {name: sum("placement: moving" in line for line in proc.stderr) for name, proc in workers.items()}


def _stable(consul_addr: str, service: str, quiet_s: float = 3 * float(INTERVAL_S) + 3) -> dict[str, tuple[int, int]]:
    """The registered ranges once they stopped changing for ``quiet_s`` (bounded: 120 s)."""
    deadline = time.monotonic() + 120
    last, since = _instances(consul_addr, service), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"ranges still changing: {last}"
        time.sleep(0.5)
        now = _instances(consul_addr, service)
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.mark.timeout(1500)  # three workers start one after another: minutes on a loaded 2-core machine
def test_auto_workers_cover_the_model_and_recover_after_a_departure(consul_addr: str, consul_service_name: str) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu").encode(TEXT, convert_to_tensor=True)
    consul = ["--consul", consul_addr, "--consul-service", consul_service_name]
    workers: dict[str, Proc] = {}
    for name in ("pa", "pb", "pc"):  # one after another: each sees the ones before it
        proc, _ = start_worker("minilm", "auto", *consul, "--worker-id", name, "--capacity", "1",
                               "--capacity-memory-mb", MEMORY_MB, "--rebalance-interval-s", INTERVAL_S)
        workers[name] = proc
        wait_until(lambda: _instances(consul_addr, consul_service_name), lambda s, n=name: n in s, 240, f"{name} registered")
        print(f"{name} registered: {_instances(consul_addr, consul_service_name)}", flush=True)
    spans = _stable(consul_addr, consul_service_name)
    print(f"stable: {spans}", flush=True)
    assert _covered(spans) and set(spans) == {"pa", "pb", "pc"}, spans
    sole = {name: [layer for layer in range(6) if [n for n, (a, b) in spans.items() if a <= layer < b] == [name]]
            for name in spans}
    leaver = next(name for name in ("pb", "pa", "pc") if sole[name])  # the only holder of some layers
    moves_before = _moves(workers)

    router = Proc([*CLI, "router", "--listen", "127.0.0.1:0", "--discovery",
                   f"consul://{consul_addr}?service={consul_service_name}", "--max-attempts", "3",
                   "--route-wait-s", "25"])  # the move takes ~8 s, longer on a loaded machine: room above the default 10
    address = fields(router.expect("shardmesh-listening"))["address"]
    outcomes: list[tuple[float, float, str]] = []  # (time sent, time answered, "ok" | "wrong" | error code)
    stop = threading.Event()

    def traffic() -> None:
        with RouterClient(address) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    out = client.infer(text=TEXT, timeout_s=30).output
                    outcome = "ok" if torch.equal(out.reshape(expected.shape), expected) else "wrong"
                except ShardmeshError as exc:
                    outcome = type(exc).__name__
                outcomes.append((sent, time.monotonic(), outcome))
                time.sleep(0.05)

    try:
        with RouterClient(address) as client:
            wait_until(lambda: client.topology().complete, bool, 60, "the router to see a complete mesh")
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        time.sleep(3)
        left_at = time.monotonic()
        assert workers[leaver].stop(signal.SIGTERM) == 0  # the only holder of some layers leaves
        wait_until(lambda: _instances(consul_addr, consul_service_name), _covered, 60, "every layer covered again")
        covered_s = time.monotonic() - left_at
        with RouterClient(address) as client:
            wait_until(lambda: client.topology().complete, bool, 30, "the router to see the new ranges")
        settled_at = time.monotonic()
        final = _stable(consul_addr, consul_service_name)  # several more rounds: nobody moves again (no flapping)
        stop.set()
        sender.join(60)
        assert _covered(final) and leaver not in final, final
    finally:
        stop.set()
        router.stop()
        for name, proc in workers.items():
            proc.stop()
            print(name, *[line for line in proc.stderr if "placement" in line or "auto" in line], sep="\n  ", flush=True)
    moves = {name: count - moves_before[name] for name, count in _moves(workers).items()}
    assert sum(moves.values()) >= 1 and max(moves.values()) == 1, moves  # recovered by moving, each at most once
    movers = [name for name, count in moves.items() if count]
    assert all(any("placement: released layers" in line for line in workers[m].stderr) for m in movers)
    before = [o for _, done, o in outcomes if done < left_at]
    # In flight at some point between the departure and the router seeing the new ranges. By answer time alone
    # this can be empty: one request sent as the leaver went waits for coverage and is answered just after.
    gap = [o for sent, done, o in outcomes if done >= left_at and sent < settled_at]
    later = [o for sent, _, o in outcomes if sent >= settled_at]
    assert before and later and set(before) == {"ok"} and set(later) == {"ok"}, (before[-5:], later[-5:])
    # While some layers have no holder (the departure until the move is registered) requests wait for coverage
    # (--route-wait-s) and then finish on the new ranges: no request is lost, none is answered wrongly.
    assert gap and set(gap) == {"ok"}, sorted(set(gap))
    waited = sum("waiting up to" in line for line in router.stderr)
    assert waited >= 1, "no request found a layer without a holder: the departure hit no traffic"
    held = max((done - sent for sent, done, _ in outcomes if done >= left_at and sent < settled_at), default=0.0)
    print(f"{leaver} left {spans}; covered again {covered_s:.1f}s later, now {final}; moves {moves}; requests before/gap/after: "
          f"{len(before)}/{len(gap)} (0 failed, longest {held:.1f}s, "
          f"{waited} waited for coverage)/{len(later)}")
