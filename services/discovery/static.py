"""Static discovery: a fixed list of worker addresses from the command line or the ``up`` config."""

from __future__ import annotations

from services.discovery.base import DiscoverySnapshot, Endpoint, SnapshotPublisher
from services.errors import ConfigError


def parse_addresses(text: str) -> tuple[str, ...]:
    """Parses ``host:port,host:port``; rejects anything without a numeric port."""
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    if not addresses:
        raise ConfigError("no worker addresses given: expected HOST:PORT[,HOST:PORT...]")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"invalid worker address {address!r}: expected HOST:PORT")
    return addresses


class StaticDiscovery:
    """Publishes the configured addresses once; the router's own health checks do the rest."""

    name = "static"

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self._addresses = addresses
        self._publisher = SnapshotPublisher()

    async def start(self) -> None:
        await self._publisher.publish(tuple(Endpoint(address=a) for a in self._addresses))

    def snapshot(self) -> DiscoverySnapshot:
        return self._publisher.current()

    async def wait_changed(self, after_version: int, timeout: float) -> DiscoverySnapshot:
        return await self._publisher.wait_changed(after_version, timeout)

    async def close(self) -> None:
        return None
