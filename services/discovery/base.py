"""The discovery interface the router consumes.

A backend only answers "which endpoints are alive, as far as I know"; the router calls Describe on
each endpoint and plans routes from that. Backends publish immutable snapshots; consumers wait for
a change with :meth:`Discovery.wait_changed` and never see a half-updated list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol


@dataclass(frozen=True)
class Endpoint:
    """One worker instance as discovery sees it."""

    address: str  # host:port of the worker's gRPC server
    service_id: str = ""  # backend's id for the instance (Consul service ID); "" for static
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __hash__(self) -> int:
        return hash((self.address, self.service_id))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and (self.address, self.service_id, dict(self.meta)) == (
            other.address,
            other.service_id,
            dict(other.meta),
        )


@dataclass(frozen=True)
class DiscoverySnapshot:
    endpoints: tuple[Endpoint, ...]
    version: int  # increases on every published change
    stale: bool = False  # True while the backend cannot reach its source and serves the last known list
    detail: str = ""  # human-readable state, e.g. "consul unreachable since 12:00:01: ..."


class Discovery(Protocol):
    """What the router needs from a discovery backend."""

    name: str

    async def start(self) -> None: ...

    def snapshot(self) -> DiscoverySnapshot: ...

    async def wait_changed(self, after_version: int, timeout: float) -> DiscoverySnapshot:
        """Returns the first snapshot with version > after_version, or the current one after ``timeout``."""
        ...

    async def close(self) -> None: ...


class SnapshotPublisher:
    """Holds the latest snapshot and wakes waiters when it changes; backends embed one."""

    def __init__(self) -> None:
        self._snapshot = DiscoverySnapshot(endpoints=(), version=0)
        self._changed = asyncio.Condition()

    def current(self) -> DiscoverySnapshot:
        return self._snapshot

    async def publish(self, endpoints: tuple[Endpoint, ...] | None = None, *, stale: bool | None = None, detail: str | None = None) -> bool:
        """Publishes a new snapshot if anything differs; returns whether it did."""
        old = self._snapshot
        new_endpoints = old.endpoints if endpoints is None else tuple(sorted(endpoints, key=lambda e: (e.address, e.service_id)))
        new_stale = old.stale if stale is None else stale
        new_detail = old.detail if detail is None else detail
        if (new_endpoints, new_stale, new_detail) == (old.endpoints, old.stale, old.detail):
            return False
        async with self._changed:
            self._snapshot = DiscoverySnapshot(new_endpoints, old.version + 1, new_stale, new_detail)
            self._changed.notify_all()
        return True

    async def wait_changed(self, after_version: int, timeout: float) -> DiscoverySnapshot:
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._snapshot.version > after_version), timeout
                )
            except TimeoutError:
                pass
            return self._snapshot
