"""``shardmesh bench``: the mesh measured side by side with the single-process model and a peer system.

Suites are registered in :mod:`services.bench.main`; the ``infer`` suite lives in :mod:`services.bench.infer`.
Pure pieces (:mod:`stats`, :mod:`records`, :mod:`workloads`) import no torch or gRPC so they test without sockets.
"""
