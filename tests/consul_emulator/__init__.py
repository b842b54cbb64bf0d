"""A Consul HTTP API emulator for tests (never shipped): the agent, health, catalog and status endpoints
shardmesh uses, with Consul's check, index and blocking-query semantics, plus fault controls.

Run it standalone with ``python -m tests.consul_emulator --port 8500``; see ``server.py`` for the
endpoints and what is not emulated, ``checks.py`` for check timing, ``state.py`` for index rules.
"""

from __future__ import annotations

from tests.consul_emulator.server import ConsulEmulator

__all__ = ["ConsulEmulator"]
