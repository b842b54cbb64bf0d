"""One exception hierarchy for shardmesh, mapped to gRPC status codes in one table.

Servicers raise these; :func:`status_of` turns any exception into ``(code, message)`` by walking the
class MRO through :data:`STATUS_TABLE`. Unknown exceptions become INTERNAL with a generic message, so
no stack trace or internal detail reaches a client.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class ShardmeshError(Exception):
    """Base of every error that shardmesh reports to a caller."""

    def __init__(self, message: str, *, failed_worker_id: str = "", failed_address: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.failed_worker_id = failed_worker_id
        self.failed_address = failed_address
        # Relay: the ForwardResponse that carried this error (completed hops, undelivered activation).
        self.relay_response: Any = None

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ShardmeshError):
    """The request itself is wrong (bad tensor, empty text, unknown field value)."""


class FailedPrecondition(ShardmeshError):
    """The mesh cannot serve the request as it stands (route gap, checksum mismatch, wrong layers)."""


class ResourceExhausted(ShardmeshError):
    """A bounded queue, budget or size limit is full; retry later or elsewhere."""


class Unavailable(ShardmeshError):
    """A hop could not be reached or failed transiently; another replica may serve."""


class DeadlineExceeded(ShardmeshError):
    """The request ran out of time (possibly on a named hop)."""


class NotFound(ShardmeshError):
    """A named thing (model, session) does not exist."""


class Cancelled(ShardmeshError):
    """The caller went away."""


class AlreadyExists(ShardmeshError):
    """A request with this id (or a session with this key) is already in flight."""


class PermissionDenied(ShardmeshError):
    """The caller is known but may not do this (wrong tenant, unsigned route, someone else's session)."""


class Unauthenticated(ShardmeshError):
    """The caller presented no credentials, or credentials this server does not accept."""


class ConfigError(ShardmeshError):
    """Bad configuration or command-line input: reported to the user, never a traceback."""


STATUS_TABLE: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Cancelled: grpc.StatusCode.CANCELLED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ShardmeshError: grpc.StatusCode.INTERNAL,
}

_CODE_TO_ERROR: dict[grpc.StatusCode, type[ShardmeshError]] = {
    code: cls for cls, code in STATUS_TABLE.items() if cls not in (ConfigError, ShardmeshError)
}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

GENERIC_INTERNAL_MESSAGE = "internal error in shardmesh; see the server log"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps an exception to the status a caller sees."""
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE


def code_from_int(value: int) -> grpc.StatusCode:
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def error_from_status(
    code: grpc.StatusCode, message: str, *, failed_worker_id: str = "", failed_address: str = ""
) -> ShardmeshError:
    """The inverse of :func:`status_of`, for errors coming back from a remote hop."""
    cls = _CODE_TO_ERROR.get(code, ShardmeshError)
    return cls(message, failed_worker_id=failed_worker_id, failed_address=failed_address)


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError, *, worker_id: str = "", address: str = "") -> ShardmeshError:
    """Turns a failed call to a peer into a ShardmeshError naming that peer."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return error_from_status(code, details or code.name, failed_worker_id=worker_id, failed_address=address)


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def grpc_errors(func: _Handler) -> _Handler:
    """Decorates an async unary servicer method: exceptions become a gRPC status via the table."""

    @functools.wraps(func)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await func(self, request, context)
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", func.__qualname__)
            await context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(
    func: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    """Like :func:`grpc_errors` for async-generator (server-streaming) servicer methods."""

    @functools.wraps(func)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in func(self, request, context):
                yield item
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", func.__qualname__)
            await context.abort(code, message)

    return wrapper


async def run_guarded(coro: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    """Awaits ``coro`` and returns ``(result, None)`` or ``(None, exc)``; used per request on streams."""
    try:
        return await coro, None
    except Exception as exc:  # noqa: BLE001
        return None, exc
