"""``--discovery URL`` parsing: one frozen spec built once in ``main()``, then one backend from it.

Accepted forms::

    static://HOST:PORT[,HOST:PORT...]
    consul://HOST:PORT[?service=NAME]
    consul://[?service=NAME]           (agent from $CONSUL_HTTP_ADDR, else 127.0.0.1:8500)

``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_SSL`` and ``CONSUL_HTTP_SSL_VERIFY`` apply to both consul forms.
The environment is an injected mapping so tests and ``main()`` decide what it is.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from services.discovery.base import Discovery
from services.discovery.consul_client import (
    DEFAULT_SERVICE_NAME,
    ConsulAddress,
    parse_consul_address,
    split_hostport,
)
from services.discovery.static import StaticDiscovery, parse_addresses
from services.errors import ConfigError

_EXAMPLES = (
    "static://HOST:PORT[,HOST:PORT...] or consul://HOST:PORT[?service=NAME], "
    f"e.g. consul://127.0.0.1:8500?service={DEFAULT_SERVICE_NAME}"
)
_CONSUL_EXAMPLE = f"consul://HOST:PORT[?service=NAME], e.g. consul://127.0.0.1:8500?service={DEFAULT_SERVICE_NAME}"
_SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class DiscoverySpec:
    """What ``--discovery`` asked for; ``addresses`` for static, ``consul`` + ``service`` for consul."""

    kind: Literal["static", "consul"]
    addresses: tuple[str, ...] = ()
    consul: ConsulAddress | None = None
    service: str = DEFAULT_SERVICE_NAME


def validate_service_name(name: str) -> str:
    """Consul accepts more, but anything else breaks DNS look-ups or the URL path of the health API."""
    if not _SERVICE_NAME_RE.match(name):
        raise ConfigError(
            f"invalid Consul service name {name!r}: expected letters, digits, '-', '_' or '.', "
            f"e.g. {DEFAULT_SERVICE_NAME}"
        )
    return name


def parse_discovery(url: str, env: Mapping[str, str]) -> DiscoverySpec:
    """Parses a ``--discovery`` URL; every error names a valid example."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError(f"invalid discovery URL {url!r}: missing scheme; expected {_EXAMPLES}")
    scheme = scheme.lower()
    if scheme == "static":
        try:
            return DiscoverySpec(kind="static", addresses=parse_addresses(rest))
        except ConfigError as exc:
            raise ConfigError(f"invalid discovery URL {url!r}: {exc}, e.g. static://10.0.0.1:50051,10.0.0.2:50051") from None
    if scheme != "consul":
        raise ConfigError(f"invalid discovery URL {url!r}: unknown scheme {scheme!r}; expected {_EXAMPLES}")

    parts = urllib.parse.urlsplit(text)
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"invalid discovery URL {url!r}: unexpected path; expected {_CONSUL_EXAMPLE}")
    if "@" in parts.netloc:
        # The URL is not echoed: it would print the credentials.
        raise ConfigError(f"invalid discovery URL: no credentials in it, put the ACL token in $CONSUL_HTTP_TOKEN; "
                          f"expected {_CONSUL_EXAMPLE}")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(f"invalid discovery URL {url!r}: malformed query; expected {_CONSUL_EXAMPLE}") from None
    unknown = sorted(set(query) - {"service"})
    if unknown:
        raise ConfigError(f"invalid discovery URL {url!r}: unknown parameter(s) {', '.join(unknown)}; expected {_CONSUL_EXAMPLE}")
    services = query.get("service", [DEFAULT_SERVICE_NAME])
    if len(services) != 1:
        raise ConfigError(f"invalid discovery URL {url!r}: give service= once; expected {_CONSUL_EXAMPLE}")
    service = validate_service_name(services[0])

    if parts.netloc:
        host, port = split_hostport(parts.netloc, what="address in discovery URL", example=_CONSUL_EXAMPLE,
                                    default_port=8500)
        address = parse_consul_address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", env)
    else:
        address = parse_consul_address(None, env)
    return DiscoverySpec(kind="consul", consul=address, service=service)


def build_discovery(spec: DiscoverySpec, **consul_options: object) -> Discovery:
    """Builds the backend for ``spec``; ``consul_options`` go to :class:`ConsulDiscovery` (e.g. ``wait="1s"``)."""
    if spec.kind == "static":
        return StaticDiscovery(spec.addresses)
    from services.discovery.consul import ConsulDiscovery  # imported here: static users never load py-consul

    if spec.consul is None:
        raise ConfigError(f"consul discovery needs an agent address; expected {_CONSUL_EXAMPLE}")
    return ConsulDiscovery(spec.consul, spec.service, **consul_options)  # type: ignore[arg-type]
