"""The router dials what discovery gave it, and notices a worker that came back at the same address as
something else (real worker and router processes, static discovery)."""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

import pytest
import torch

from services.client import RouterClient
from tests.consul_fixtures import wait_until
from tests.procs import start_router, start_worker, wait_serving

pytestmark = [pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spans(client: RouterClient) -> dict[str, tuple[int, int]]:
    return {w.address: (w.layers.start, w.layers.end) for w in client.topology().workers}


def test_router_dials_the_static_address_not_the_advertised_one() -> None:
    # The worker reports an address nothing listens on (as a wildcard bind or NAT would give): the router
    # was given the right one and must keep dialling it.
    wrong, address = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    worker, reported = start_worker("minilm", "0:6", "--listen", address, "--advertise", wrong, "--worker-id", "adv-w0")
    assert reported == wrong
    router = None
    try:
        wait_serving(address)
        router, router_address = start_router([address])
        with RouterClient(router_address) as client:
            wait_until(lambda: client.topology().complete, bool, 60, "a complete route")
            views = client.topology().workers
            assert [(w.worker_id, w.address) for w in views] == [("adv-w0", address)]
            result = client.infer(text="dial what you were given", timeout_s=30)
            assert result.route == ("adv-w0",) and result.attempts == 1
    finally:
        if router is not None:
            assert router.stop() == 0
        assert worker.stop() == 0


def test_worker_restarted_with_another_range_at_the_same_address_is_described_again() -> None:
    first, a = start_worker("minilm", "0:3")
    second, b = start_worker("minilm", "3:6")
    router = None
    procs = [first, second]
    try:
        wait_serving(a)
        wait_serving(b)
        router, router_address = start_router([a, b])
        with RouterClient(router_address) as client:
            wait_until(lambda: client.topology().complete, bool, 60, "a complete route")
            assert _spans(client) == {a: (0, 3), b: (3, 6)}
            before = client.infer(text="same text, other layout", timeout_s=30)

            # Both come back at the same addresses, ranges swapped: nothing in discovery changes.
            assert first.stop() == 0 and second.stop() == 0
            procs = []
            for span, address in (("3:6", a), ("0:3", b)):
                proc, bound = start_worker("minilm", span, "--listen", address)
                procs.append(proc)
                assert bound == address
                wait_serving(address)
            started = time.monotonic()
            wait_until(lambda: _spans(client), lambda s: s == {a: (3, 6), b: (0, 3)}, 20, "the swapped ranges in the table")
            noticed_s = time.monotonic() - started
            after = wait_until(lambda: _try_infer(client), lambda r: r is not None, 10, "an answer over the new layout")
            assert torch.equal(after.output, before.output)
            assert [addr for addr in (b, a)] == [_address_of(client, wid) for wid in after.route]
            assert noticed_s < 10, f"the router took {noticed_s:.1f}s to notice the new ranges"
    finally:
        if router is not None:
            assert router.stop() == 0
        for proc in procs:
            proc.stop(signal.SIGKILL)


def _try_infer(client: RouterClient) -> Any:
    try:
        return client.infer(text="same text, other layout", timeout_s=30)
    except Exception:  # noqa: BLE001 - retried by _wait until the deadline
        return None


def _address_of(client: RouterClient, worker_id: str) -> str:
    return next(w.address for w in client.topology().workers if w.worker_id == worker_id)
