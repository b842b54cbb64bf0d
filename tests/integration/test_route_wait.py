"""Holding requests while a layer range has no worker (``--route-wait-s``), with real processes and weights.

A stage's only worker leaves and another one for the same layers arrives seconds later, while clients keep
sending: with the wait, every request issued in the gap is answered, and the answers equal
sentence-transformers' own ``encode``; with ``--route-wait-s 0`` such a request fails at once with UNAVAILABLE
naming the layers; a request whose deadline ends first fails with UNAVAILABLE saying how long it waited.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from services.client import RouterClient
from services.errors import ShardmeshError, Unavailable
from services.models.registry import resolve_model
from tests.consul_fixtures import wait_until
from tests.procs import CLI, Proc, fields, start_worker, wait_serving

pytestmark = [pytest.mark.integration]

TEXT = "Hold on, the layers are coming back."


@pytest.fixture(scope="module")
def expected() -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu").encode(TEXT, convert_to_tensor=True)


def _router(*args: str) -> tuple[Proc, str]:
    proc = Proc([*CLI, "router", "--listen", "127.0.0.1:0", *args])
    return proc, fields(proc.expect("shardmesh-listening"))["address"]


class Traffic:
    """Clients sending one request after another, each outcome kept with when it was sent and how long it took."""

    def __init__(self, address: str, expected: torch.Tensor, clients: int = 2, timeout_s: float = 60.0) -> None:
        self.outcomes: list[tuple[float, float, str]] = []  # (sent at, seconds, "ok" | "wrong" | error + message)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(address, expected, timeout_s), daemon=True)
                         for _ in range(clients)]

    def _send(self, address: str, expected: torch.Tensor, timeout_s: float) -> None:
        with RouterClient(address) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    out = client.infer(text=TEXT, timeout_s=timeout_s).output
                    outcome = "ok" if torch.equal(out.reshape(expected.shape), expected) else "wrong"
                except ShardmeshError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                self.outcomes.append((sent, time.monotonic() - sent, outcome))
                time.sleep(0.1)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


@pytest.fixture
def consul_mesh(consul_addr: str, consul_service_name: str) -> Iterator[tuple[list[str], dict[str, Proc]]]:
    consul = ["--consul", consul_addr, "--consul-service", consul_service_name]
    workers: dict[str, Proc] = {}
    try:
        for name, layers in (("w0", "0:3"), ("w1", "3:6")):
            workers[name], address = start_worker("minilm", layers, *consul, "--worker-id", name)
            wait_serving(address)
        yield consul, workers
    finally:
        for proc in workers.values():
            proc.stop()


@pytest.mark.consul
@pytest.mark.timeout(900)
def test_requests_wait_for_a_replacement_worker_then_fail_fast_without_the_wait(
    consul_mesh: tuple[list[str], dict[str, Proc]], consul_addr: str, consul_service_name: str, expected: torch.Tensor
) -> None:
    consul, workers = consul_mesh
    discovery = ["--discovery", f"consul://{consul_addr}?service={consul_service_name}"]
    waiting, waiting_addr = _router(*discovery, "--route-wait-s", "45")
    failing, failing_addr = _router(*discovery, "--route-wait-s", "0")
    try:
        for address in (waiting_addr, failing_addr):
            with RouterClient(address) as client:
                wait_until(lambda c=client: c.topology(), lambda t: t.complete and len(t.workers) == 2, 60, "both workers")
        with Traffic(waiting_addr, expected) as traffic:
            time.sleep(2)
            left_at = time.monotonic()
            assert workers["w1"].stop(signal.SIGTERM) == 0  # the only worker of layers 3:6 leaves
            with RouterClient(failing_addr) as client:  # the router without a wait answers at once
                wait_until(lambda: client.topology(), lambda t: not t.complete, 30, "the departure to be seen")
                started = time.monotonic()
                with pytest.raises(Unavailable) as info:
                    client.infer(text=TEXT, timeout_s=30)
                fast_s = time.monotonic() - started
            assert "3:6" in str(info.value) and "waited" not in str(info.value), info.value
            assert fast_s < 3, f"--route-wait-s 0 took {fast_s:.1f}s to fail"
            time.sleep(3)  # requests pile up on the waiting router meanwhile
            workers["w1b"], address = start_worker("minilm", "3:6", *consul, "--worker-id", "w1b")
            wait_serving(address)
            with RouterClient(waiting_addr) as client:
                wait_until(lambda: client.topology(), lambda t: t.complete, 60, "the replacement to be seen")
            back_at = time.monotonic()
            time.sleep(2)
        gap = [(s, d, o) for s, d, o in traffic.outcomes if s < back_at and s + d > left_at]  # in flight in the gap
        assert all(o == "ok" for _, _, o in traffic.outcomes), [o for _, _, o in traffic.outcomes if o != "ok"][:3]
        held = max(d for _, d, _ in gap)
        assert len(gap) >= 2 and held > 3, (len(gap), held)  # requests were in flight in the gap and held through it
        assert any(s >= back_at for s, _, _ in traffic.outcomes)

        # A request whose own deadline ends before coverage returns fails with UNAVAILABLE, saying it waited.
        assert workers["w1b"].stop(signal.SIGTERM) == 0
        with RouterClient(waiting_addr) as client:
            wait_until(lambda: client.topology(), lambda t: not t.complete, 30, "the second departure to be seen")
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                client.infer(text=TEXT, timeout_s=3)
            bounded_s = time.monotonic() - started
        assert "3:6" in str(info.value) and "waited" in str(info.value) and "for coverage" in str(info.value), info.value
        assert 1.5 < bounded_s < 3, bounded_s
        print(f"gap {back_at - left_at:.1f}s: {len(gap)} requests in flight in it, all answered (longest held {held:.1f}s); "
              f"--route-wait-s 0 failed in {fast_s:.2f}s; a 3 s deadline failed after {bounded_s:.1f}s: {info.value}")
    finally:
        waiting.stop()
        failing.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(600)
def test_a_worker_restarted_in_place_is_waited_for_under_static_discovery(expected: torch.Tensor) -> None:
    """A rolling restart with static discovery: the worker of layers 3:6 is killed and comes back at the same
    address; requests that failed on it wait, see it answer SERVING again and finish there."""
    w0, a0 = start_worker("minilm", "0:3", "--worker-id", "w0")
    w1_address = f"127.0.0.1:{_free_port()}"
    w1 = Proc([*CLI, "worker", "--model", "minilm", "--layers", "3:6", "--listen", w1_address, "--worker-id", "w1"])
    router: Proc | None = None
    try:
        wait_serving(a0)
        wait_serving(w1_address)
        router, address = _router("--workers", f"{a0},{w1_address}", "--route-wait-s", "45")
        with RouterClient(address) as client:
            wait_until(lambda: client.topology(), lambda t: t.complete, 60, "a complete route")
        with Traffic(address, expected) as traffic:
            time.sleep(2)
            killed_at = time.monotonic()
            w1.stop(signal.SIGKILL)
            time.sleep(3)
            w1 = Proc([*CLI, "worker", "--model", "minilm", "--layers", "3:6", "--listen", w1_address, "--worker-id",
                       "w1"])
            wait_serving(w1_address)
            back_at = time.monotonic()
            time.sleep(3)
        gap = [(s, d, o) for s, d, o in traffic.outcomes if s < back_at and s + d > killed_at]  # in flight in the gap
        assert all(o == "ok" for _, _, o in traffic.outcomes), [o for _, _, o in traffic.outcomes if o != "ok"][:3]
        held = max(d for _, d, _ in gap)
        assert len(gap) >= 2 and held > 3, (len(gap), held)
        assert any(s >= back_at for s, _, _ in traffic.outcomes)
        print(f"restart gap {back_at - killed_at:.1f}s: {len(gap)} requests in flight in it, all answered "
              f"(longest held {held:.1f}s)")
    finally:
        if router is not None:
            router.stop()
        w1.stop()
        w0.stop()
