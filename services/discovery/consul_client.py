"""Where the Consul agent is, and one way to build a ``consul.aio.Consul`` client for it.

The worker (``--consul HOST:PORT``) and the router (``--discovery consul://...``) both resolve the agent
address here, so the standard variables ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN`` (or
``CONSUL_HTTP_TOKEN_FILE``, read when no token is given, as Consul's Go client does), ``CONSUL_HTTP_SSL``
and ``CONSUL_HTTP_SSL_VERIFY`` mean the same thing to both. The environment is passed in as a mapping
(never read at import time), and the client is built with everything explicit because py-consul would
otherwise read the process environment itself (and lets ``CONSUL_HTTP_TOKEN`` override an explicit token).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import consul.aio

from services.errors import ConfigError

DEFAULT_SERVICE_NAME = "shardmesh-worker"
DEFAULT_CONSUL_HOST = "127.0.0.1"
DEFAULT_CONSUL_PORT = 8500
_ADDRESS_EXAMPLE = "HOST:PORT or http(s)://HOST:PORT, e.g. 127.0.0.1:8500"


@dataclass(frozen=True)
class ConsulAddress:
    """How to reach one Consul agent's HTTP API."""

    host: str = DEFAULT_CONSUL_HOST
    port: int = DEFAULT_CONSUL_PORT
    scheme: str = "http"  # "http" | "https"
    token: str | None = None  # ACL token, sent as X-Consul-Token
    verify: bool = True  # verify the agent's TLS certificate (https only)

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __repr__(self) -> str:  # never print the token
        return f"ConsulAddress({self.scheme}://{self.hostport}, token={'set' if self.token else 'unset'})"


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "t", "true", "yes", "on"):
        return True
    if raw in ("0", "f", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={env.get(name)!r} is not a boolean: expected true or false")


def split_hostport(text: str, *, what: str, example: str, default_port: int | None = None) -> tuple[str, int]:
    """Splits ``HOST:PORT`` / ``[V6]:PORT`` (port optional when ``default_port`` is given)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid {what} {text!r}: expected {example}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" not in text:
        host, port_text = text, ""
    else:
        raise ConfigError(f"invalid {what} {text!r}: IPv6 hosts need brackets; expected {example}")
    if not host:
        raise ConfigError(f"invalid {what} {text!r}: missing host; expected {example}")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"invalid {what} {text!r}: missing port; expected {example}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"invalid {what} {text!r}: port must be 1-65535; expected {example}")
    return host, int(port_text)


def _token_from_file(path: str) -> str | None:
    """The ACL token in ``CONSUL_HTTP_TOKEN_FILE`` (e.g. a mounted Kubernetes Secret), whitespace trimmed."""
    if not path.strip():
        return None
    try:
        with open(path.strip(), encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"CONSUL_HTTP_TOKEN_FILE={path!r} cannot be read: {exc.strerror or exc}") from None
    if not token:
        raise ConfigError(f"CONSUL_HTTP_TOKEN_FILE={path!r} is empty: it must hold the ACL token")
    return token


def parse_consul_address(text: str | None, env: Mapping[str, str]) -> ConsulAddress:
    """Resolves the agent address from ``text`` (``HOST:PORT`` or ``http(s)://HOST:PORT``), else from
    ``CONSUL_HTTP_ADDR``, else ``127.0.0.1:8500`` — the same fallbacks Consul's own clients use."""
    source = "address"
    if not text or not text.strip():
        text = env.get("CONSUL_HTTP_ADDR", "").strip()
        source = "CONSUL_HTTP_ADDR"
    scheme = "http"
    host, port = DEFAULT_CONSUL_HOST, DEFAULT_CONSUL_PORT
    if text:
        prefix, sep, rest = text.partition("://")
        if sep:
            if prefix.lower() not in ("http", "https"):
                raise ConfigError(f"invalid Consul {source} {text!r}: scheme must be http or https; expected {_ADDRESS_EXAMPLE}")
            scheme, text = prefix.lower(), rest.rstrip("/")
        host, port = split_hostport(text, what=f"Consul {source}", example=_ADDRESS_EXAMPLE,
                                    default_port=DEFAULT_CONSUL_PORT)
    if _env_bool(env, "CONSUL_HTTP_SSL"):  # like Consul's Go client: true forces https, false changes nothing
        scheme = "https"
    verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY")
    token = env.get("CONSUL_HTTP_TOKEN") or _token_from_file(env.get("CONSUL_HTTP_TOKEN_FILE", ""))
    return ConsulAddress(host=host, port=port, scheme=scheme, token=token, verify=True if verify is None else verify)


def make_client(address: ConsulAddress, *, http_timeout_s: float) -> consul.aio.Consul:
    """Builds an aio client; call inside a running event loop and ``await client.close()`` when done.

    ``http_timeout_s`` is aiohttp's total per-request timeout. For blocking queries it must exceed
    ``wait x 17/16`` (Consul adds up to wait/16 of jitter) or every long poll would time out.
    """
    with warnings.catch_warnings():
        # py-consul 1.8 passes aiohttp arguments that newer aiohttp deprecates; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        client = consul.aio.Consul(
            host=f"[{address.host}]" if ":" in address.host else address.host,
            port=address.port,
            scheme=address.scheme,
            token=address.token,
            verify=address.verify,
            connections_timeout=http_timeout_s,
        )
    client.token = address.token  # py-consul lets $CONSUL_HTTP_TOKEN override the explicit token
    return client
