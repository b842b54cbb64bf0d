"""Chaos harness: steady load against a router, faults injected into worker processes, and a checker
that reads the recorded history afterwards (Jepsen style). Used by the chaos tests and by
``shardmesh bench failover``."""
