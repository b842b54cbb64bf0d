"""Local meshes: a router and workers as child processes on this machine (``shardmesh up``, ``demo``, tests)."""
