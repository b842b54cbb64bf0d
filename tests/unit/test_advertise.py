"""What a worker advertises for a wildcard bind: an address of this host that peers can dial."""

from __future__ import annotations

import socket

from services.lifecycle import primary_host


def test_wildcard_bind_advertises_an_address_of_this_host() -> None:
    host = primary_host("0.0.0.0")
    assert host != "0.0.0.0"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))  # it is one of this host's addresses, not a guess
    if host != "127.0.0.1":  # a host with a route: never loopback, which no other host can reach
        assert not host.startswith("127.")
