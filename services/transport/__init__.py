"""Client side of worker-to-worker and router-to-worker calls: persistent channels and multiplexed streams."""
