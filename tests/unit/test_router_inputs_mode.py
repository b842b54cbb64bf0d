"""Mode resolution: 0 is the router's default; an unknown enum value is refused, never echoed back."""

from __future__ import annotations

import pytest

from services.errors import InvalidArgument
from services.gen.shardmesh.v1 import tensor_pb2
from router.inputs import resolve_mode


def test_unspecified_mode_takes_the_default() -> None:
    assert resolve_mode(tensor_pb2.MODE_UNSPECIFIED, tensor_pb2.MODE_RELAY) == tensor_pb2.MODE_RELAY


@pytest.mark.parametrize("mode", [tensor_pb2.MODE_DIRECT, tensor_pb2.MODE_RELAY])
def test_known_modes_are_kept(mode: int) -> None:
    assert resolve_mode(mode, tensor_pb2.MODE_DIRECT) == mode


@pytest.mark.parametrize("mode", [3, 7, 2**31 - 1, -1])
def test_unknown_modes_are_invalid_arguments(mode: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"mode: {mode} is not a Mode"):
        resolve_mode(mode, tensor_pb2.MODE_DIRECT)
