"""Every row of the error table, through a real grpc.aio server (not grpc_testing: it has no aio)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import errors
from services.errors import STATUS_TABLE, grpc_errors, status_of


@pytest.mark.parametrize("cls", list(STATUS_TABLE))
def test_every_row_maps_through_mro(cls: type[Exception]) -> None:
    class Sub(cls):  # type: ignore[misc, valid-type]
        pass

    code, message = status_of(Sub("boom"))
    assert code == STATUS_TABLE[cls]
    assert message == "boom"


def test_unknown_errors_become_generic_internal() -> None:
    code, message = status_of(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message


def test_round_trip_status_to_error() -> None:
    for cls, code in STATUS_TABLE.items():
        if cls in (errors.ConfigError, errors.ShardmeshError):
            continue
        err = errors.error_from_status(code, "m", failed_worker_id="w1")
        assert isinstance(err, cls) and err.failed_worker_id == "w1"


class _Failing(health_pb2_grpc.HealthServicer):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @grpc_errors
    async def Check(self, request: object, context: grpc.aio.ServicerContext) -> object:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [cls("what to fix") for cls in STATUS_TABLE] + [RuntimeError("hidden detail")],
    ids=lambda e: type(e).__name__,
)
async def test_status_reaches_a_real_client(exc: BaseException) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(_Failing(exc), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        expected_code, expected_message = status_of(exc)
        assert info.value.code() == expected_code
        assert info.value.details() == expected_message
    finally:
        await server.stop(None)
