"""Mode resolution: 0 is the router's default; an unknown enum value is refused, never echoed back. And the
per-request position check of token-id inputs."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import router_pb2, tensor_pb2
from router.inputs import request_inputs, resolve_mode


def test_unspecified_mode_takes_the_default() -> None:
    assert resolve_mode(tensor_pb2.MODE_UNSPECIFIED, tensor_pb2.MODE_RELAY) == tensor_pb2.MODE_RELAY


@pytest.mark.parametrize("mode", [tensor_pb2.MODE_DIRECT, tensor_pb2.MODE_RELAY])
def test_known_modes_are_kept(mode: int) -> None:
    assert resolve_mode(mode, tensor_pb2.MODE_DIRECT) == mode


@pytest.mark.parametrize("mode", [3, 7, 2**31 - 1, -1])
def test_unknown_modes_are_invalid_arguments(mode: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"mode: {mode} is not a Mode"):
        resolve_mode(mode, tensor_pb2.MODE_DIRECT)


async def test_a_loaded_tokenizer_checks_token_counts_on_the_loop() -> None:
    """Every token-id request checks the model's position limit: with the tokenizer loaded that takes no
    thread hand-off and never calls the loader; before it is loaded, the loader runs (in a thread)."""
    limited = SimpleNamespace(max_positions=4)
    loads: list[threading.Thread] = []

    def loader() -> object:
        loads.append(threading.current_thread())
        return limited

    five = router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[1, 2, 3, 4, 5]))
    with pytest.raises(InvalidArgument, match="5 tokens exceed the model's maximum of 4"):
        await request_inputs(five, loader, 1 << 20, lambda: limited)
    assert loads == []
    ids, mask = await request_inputs(router_pb2.InferRequest(tokens=router_pb2.TokenIds(ids=[1, 2])), loader, 1 << 20)
    assert ids.shape == [1, 2] and mask is None
    assert len(loads) == 1 and loads[0] is not threading.main_thread()
    with pytest.raises(InvalidArgument, match="5 tokens exceed"):
        await request_inputs(five, loader, 1 << 20)
