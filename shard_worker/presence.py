"""The worker's presence in Consul: register once SERVING, deregister first thing on shutdown.

If the agent is unreachable at start-up the worker keeps serving and retries registration in the
background (with capped back-off): a Consul outage must not take healthy capacity away. A refused ACL
token is a configuration error: it is logged as one, naming the variable and the missing right, and
retried only every ``ACL_RETRY_S`` (a policy may be fixed without restarting the worker). Once
registered, the registrar re-registers whenever the agent forgets the instance (see
:class:`~services.discovery.registration.ConsulRegistrar`): within ``RESYNC_S`` for a gRPC check, within
a heartbeat (TTL / 3) for a TTL check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import aiohttp
import consul.aio
import consul.base

from services.config import ConsulRegistration
from services.discovery.consul_client import make_client
from services.discovery.registration import ConsulAclRefused, ConsulRegistrar, worker_meta
from services.errors import ShardmeshError, Unavailable
from services.models.base import ModelSource
from services.layers import LayerSpan
from services.net import split_host_port

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0
ACL_RETRY_S = 30.0
CHECK_INTERVAL_S = 1.0  # the agent's gRPC probe period
TTL_S = 6.0  # TTL of the TTL check; heartbeats go every TTL / 3
PEERS_TIMEOUT_S = 5.0  # listing the other workers for --layers auto
RESYNC_S = CHECK_INTERVAL_S  # a gRPC-checked worker asks its agent whether it still knows it this often


class ConsulPresence:
    def __init__(
        self,
        config: ConsulRegistration,
        *,
        worker_id: str,
        advertise: str,
        source: ModelSource,
        span: LayerSpan,
        max_inflight: int,
        health_listen: str | None = None,
        tls: bool = False,
        extra_meta: Mapping[str, str] | None = None,
    ) -> None:
        host, port = split_host_port(advertise, what="advertised address")
        # With TLS, the agent probes the plaintext health-only listener when there is one.
        check_port = split_host_port(health_listen, what="--health-listen")[1] if health_listen else None
        self._registrar = ConsulRegistrar(
            config.agent,
            service_name=config.service,
            service_id=worker_id,
            address=host,
            port=port,
            tags=("shardmesh", f"layers-{span.start}-{span.end}", *config.tags),
            meta=worker_meta(source.model_id, span, source.total_layers, source.checksum, max_inflight, extra=extra_meta),
            check=config.check,  # type: ignore[arg-type]
            interval_s=CHECK_INTERVAL_S,
            ttl_s=TTL_S,
            resync_s=RESYNC_S,
            check_port=check_port,
            grpc_use_tls=tls and check_port is None,
        )
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()
        self.registrar = self._registrar
        self._config = config
        self._source = source
        self._max_inflight = max_inflight
        self._extra_meta = dict(extra_meta or {})
        self._peers_client: consul.aio.Consul | None = None

    async def move_to(self, span: LayerSpan) -> None:
        """Registers again with a new layer range (same service ID): routers see the Meta change and
        describe this worker again. Raises ShardmeshError when the agent refuses."""
        meta = worker_meta(self._source.model_id, span, self._source.total_layers, self._source.checksum,
                           self._max_inflight, extra=self._extra_meta)
        # The registrar keeps its registration as given at start; a move replaces both (same ID, same check).
        self._registrar._meta = meta  # noqa: SLF001 - see docs/placement.md (moves re-register in place)
        self._registrar._tags = ["shardmesh", f"layers-{span.start}-{span.end}", *self._config.tags]  # noqa: SLF001
        await self._registrar.register()

    async def peers(self) -> list[tuple[str, dict[str, str]]]:
        """(service ID, Meta) of every passing instance of this service, this worker included."""
        if self._peers_client is None:
            self._peers_client = make_client(self._config.agent, http_timeout_s=PEERS_TIMEOUT_S)
        return await _list_passing(self._peers_client, self._config.service)

    def start(self) -> None:
        self._task = asyncio.create_task(self._register_until_done(), name="consul-register")

    async def _register_until_done(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            try:
                await self._registrar.register()
                self.registered.set()
                log.info("registered in Consul as %s", self._registrar.check_id.rsplit(":", 1)[0])
                return
            except ConsulAclRefused as exc:
                log.error("%s. This is a configuration error: the worker serves but routers using Consul will not "
                          "find it; retrying every %.0fs in case the token or its policy is fixed", exc, ACL_RETRY_S)
                await asyncio.sleep(ACL_RETRY_S)
                continue
            except ShardmeshError as exc:
                log.warning("Consul registration failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def stop(self) -> None:
        """Deregisters (bounded; tolerant of Consul being down) and stops heartbeats."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.registered.is_set():
            await self._registrar.deregister()
        await self._registrar.close()
        if self._peers_client is not None:
            await self._peers_client.close()


async def list_peers(config: ConsulRegistration) -> list[tuple[str, dict[str, str]]]:
    """(service ID, Meta) of every passing instance, before this worker has a presence (placement at start)."""
    client = make_client(config.agent, http_timeout_s=PEERS_TIMEOUT_S)
    try:
        return await _list_passing(client, config.service)
    finally:
        await client.close()


async def _list_passing(client: consul.aio.Consul, service: str) -> list[tuple[str, dict[str, str]]]:
    try:
        _, entries = await asyncio.wait_for(client.health.service(service, passing=True), PEERS_TIMEOUT_S)
    except (asyncio.TimeoutError, consul.base.ConsulException, OSError, aiohttp.ClientError) as exc:
        raise Unavailable(f"cannot list {service} instances from Consul: {exc}") from None
    return [(e["Service"]["ID"], dict(e["Service"].get("Meta") or {})) for e in entries or ()]
