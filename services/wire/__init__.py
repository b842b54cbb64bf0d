"""The tensor wire format: torch tensors to and from ``shardmesh.v1.Tensor`` without pickle."""
