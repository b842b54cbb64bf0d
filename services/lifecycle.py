"""One server lifecycle shared by router and worker.

build -> bind (port 0 picks a free port) -> start (health NOT_SERVING) -> load -> SERVING -> ...
SIGTERM/SIGINT -> NOT_SERVING -> (deregister, drain: the caller's job) -> stop. The bound address is
printed as one ``LISTENING_PREFIX`` line on stdout so a parent process (``shardmesh up``) can read it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.errors import ConfigError
from services.reflection import V1_METHOD as REFLECTION_V1_METHOD
from services.reflection import enable_reflection
from services.telemetry import REQUESTS
from services.transport.admission import INTROSPECTION, AdmissionInterceptor
from services.transport.raw import add_parsing_servicer
from services.net import TlsFiles, join_host_port, server_options, split_host_port

log = logging.getLogger(__name__)

LISTENING_PREFIX = "shardmesh-listening"
DEFAULT_MAX_STREAMS = 256  # long-lived streams (ForwardStream, InferStream, Generate) open at once
PROBE_HEADROOM = 64  # in gRPC's outer cap, for health checks and Describe beyond calls and streams


def primary_host(wildcard: str) -> str:
    """The address other hosts most likely reach this one by, for a wildcard bind without ``--advertise``:
    the source address of the default route (found by a UDP ``connect``, which sends nothing); loopback
    when there is no route. Peers dial what a worker advertises (Consul registration, Describe)."""
    families = [(socket.AF_INET6, "2001:db8::1", "::1")] if wildcard == "::" else []
    families.append((socket.AF_INET, "192.0.2.1", "127.0.0.1"))
    for family, probe, _ in families:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))
                host = str(sock.getsockname()[0])
        except OSError:
            continue
        if host and not host.startswith(("127.", "::1")):
            return host
    fallback = families[0][2]
    log.warning("no route off this host; advertising %s: set --advertise HOST:PORT for peers on other hosts", fallback)
    return fallback


class ServerLifecycle:
    """A grpc.aio server plus the standard health and reflection services."""

    def __init__(
        self,
        component: str,
        service_names: Iterable[str],
        tls: TlsFiles | None = None,
        max_concurrent_rpcs: int | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_receive_bytes: int | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self.component = component
        # Beyond this many concurrent RPCs gRPC answers RESOURCE_EXHAUSTED before a handler runs, so a flood of
        # unary calls cannot queue unbounded request bodies in memory.
        # The same number caps HTTP/2 streams per connection, so a flooding client queues its calls locally
        # instead of pushing their bodies into this process.
        # max_receive_bytes: larger messages are refused from their length prefix, before they are buffered.
        base_options = server_options(max_receive_bytes)
        options = base_options if max_concurrent_rpcs is None else (
            *base_options, ("grpc.max_concurrent_streams", max_concurrent_rpcs)
        )
        # Short calls and long-lived streams are admitted separately (services/transport/admission.py), and
        # health, reflection and Describe never: idle streams cannot starve probes. gRPC's own cap stays as an
        # outer bound on everything at once.
        outer_cap = None
        if max_concurrent_rpcs is not None:
            interceptors = (
                *interceptors,
                AdmissionInterceptor(max_concurrent_rpcs, max_streams, exempt=(*INTROSPECTION, REFLECTION_V1_METHOD),
                                     on_refused=self._count_refusal),
            )
            outer_cap = max_concurrent_rpcs + max_streams + PROBE_HEADROOM
        self.server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=outer_cap, interceptors=tuple(interceptors) or None
        )
        self.health = health.aio.HealthServicer()
        self._service_names = tuple(service_names)
        self._tls = tls
        self._stop_requested = asyncio.Event()
        self.address = ""
        self._health_server: grpc.aio.Server | None = None
        add_parsing_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, self.server)
        enable_reflection((*self._service_names, health.SERVICE_NAME), self.server)  # v1 and v1alpha

    def _count_refusal(self, method: str) -> None:
        """A call refused before any handler ran is still a request in shardmesh_requests_total."""
        REQUESTS.labels(component=self.component, rpc=method.rsplit("/", 1)[-1], code="RESOURCE_EXHAUSTED").inc()

    async def start(self, listen: str, advertise: str | None = None) -> str:
        """Binds and starts serving health (NOT_SERVING) and reflection; returns the address to advertise."""
        host, port = split_host_port(listen, what="--listen")
        creds = self._tls.server_credentials() if self._tls else None
        bind = join_host_port(host, port)
        try:
            bound = (
                self.server.add_secure_port(bind, creds) if creds else self.server.add_insecure_port(bind)
            )
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {bind}: the port is busy or the address is not local ({exc})") from None
        if bound == 0:
            raise ConfigError(f"cannot listen on {bind}: the port is busy or the address is not local")
        await self.set_serving(False)
        await self.server.start()
        self.address = advertise or join_host_port(primary_host(host) if host in ("0.0.0.0", "::") else host, bound)
        print(f"{LISTENING_PREFIX} component={self.component} address={self.address}", flush=True)
        sys.stdout.flush()
        return self.address

    async def start_health_listener(self, listen: str) -> None:
        """A plaintext listener with only grpc.health.v1, for kubelet gRPC probes when the main port uses TLS
        (kubelet probes cannot speak TLS). It shares the health state of the main server."""
        host, port = split_host_port(listen, what="--health-listen")
        server = grpc.aio.server()
        add_parsing_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, server)
        if server.add_insecure_port(join_host_port(host, port)) == 0:
            raise ConfigError(f"cannot listen on {listen} for health probes: the port is busy")
        await server.start()
        self._health_server = server

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait_for_stop(self) -> None:
        await self._stop_requested.wait()

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self._health_server is not None:
            await self._health_server.stop(None)
