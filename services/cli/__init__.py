"""The ``shardmesh`` command line: the composition root that wires router, worker and local meshes."""
