"""Addresses, channel options and TLS credentials: named constants, one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.errors import ConfigError

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# Room for a request's fields besides its tensors (ids, metadata, protobuf framing).
MESSAGE_ENVELOPE_BYTES = 1024 * 1024

# Keepalive must agree between client and server, or the server answers GOAWAY too_many_pings.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 5_000

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Fail fast on a dead peer instead of waiting for long reconnect back-offs.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.enable_retries", 0),
)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
)


def server_options(max_receive_bytes: int | None = None) -> tuple[tuple[str, int], ...]:
    """:data:`SERVER_OPTIONS` with a smaller receive limit: gRPC then refuses a larger message from its
    length prefix (RESOURCE_EXHAUSTED) and discards the bytes instead of buffering them for a handler."""
    if max_receive_bytes is None:
        return SERVER_OPTIONS
    return tuple(
        (name, max_receive_bytes if name == "grpc.max_receive_message_length" else value) for name, value in SERVER_OPTIONS
    )


def max_request_bytes(max_tensor_bytes: int, other_bytes: int = 0) -> int:
    """The receive limit that follows ``--max-tensor-mb``: a request carries at most two tensors (input and
    attention mask, each within the limit), ``other_bytes`` of other payload (text) and its envelope."""
    return 2 * max_tensor_bytes + other_bytes + MESSAGE_ENVELOPE_BYTES


def split_host_port(address: str, *, what: str = "address") -> tuple[str, int]:
    """Parses ``HOST:PORT`` (IPv6 as ``[::1]:PORT``); errors show a valid example."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"invalid {what} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for gRPC TLS. cert+key = server TLS; ca = verify peers (and require client certs on servers)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    @property
    def verifies_clients(self) -> bool:
        """A server with these files requires and verifies client certificates (mutual TLS)."""
        return self.cert is not None and self.ca is not None

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> TlsFiles:
        if (cert is None) != (key is None):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        files = cls(*(Path(p) if p else None for p in (cert, key, ca)))
        for path in (files.cert, files.key, files.ca):
            if path is not None and not path.is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        return files

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None or self.key is None:
            return None
        ca = self.ca.read_bytes() if self.ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=ca, require_client_auth=ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


Metadata = Sequence[tuple[str, str]]


def open_channel(address: str, tls: TlsFiles | None = None, *, metadata: Metadata = ()) -> grpc.aio.Channel:
    """A persistent channel to a peer, with shardmesh's options (one per peer, reused for every call).

    ``metadata`` is sent with every call on the channel: a client's bearer token, a mesh member's mesh token.
    """
    creds = tls.channel_credentials() if tls is not None else None
    if creds is None:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    return MetadataChannel(channel, metadata) if metadata else channel


class _WithMetadata:
    """A multi-callable that adds fixed metadata to each call; the call object is gRPC's own."""

    def __init__(self, callable_: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._callable = callable_
        self._metadata = metadata

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        return self._callable(*args, metadata=(*tuple(metadata or ()), *self._metadata), **kwargs)


class MetadataChannel(grpc.aio.Channel):
    """A channel whose every call carries ``metadata``.

    Not a client interceptor: gRPC's intercepted streaming calls proxy each write through a queue and a
    task, which would change the write semantics the multiplexed ForwardStream relies on.
    """

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata) -> None:
        self._channel = channel
        self._metadata = tuple(metadata)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_unary(method, *args, **kwargs), self._metadata)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.unary_stream(method, *args, **kwargs), self._metadata)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_unary(method, *args, **kwargs), self._metadata)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _WithMetadata(self._channel.stream_stream(method, *args, **kwargs), self._metadata)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def __aenter__(self) -> MetadataChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close(None)
