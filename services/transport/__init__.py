"""Calls between router and workers: persistent channels and multiplexed streams (client: pool, stream_client,
stream_writer; server: stream_server, raw parsing, admission), with the bounds and fault model described in
docs/architecture.md ("Transport fault model")."""
