"""``shardmesh worker``: build the server, load this shard's weights, serve, drain on SIGTERM.

Drain: NOT_SERVING and deregister, wait one discovery propagation interval (Consul) so routers stop
sending, then refuse new work while in-flight requests (relayed ones included) and open generation
sessions finish within ``--grace-s``. Segments of dead processes are swept at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import torch

from services.config import WorkerConfig
from services.gen.shardmesh.v1 import worker_pb2
from services.lifecycle import ServerLifecycle
from services.memory import limit_malloc_arenas
from services.models.base import StageModel
from services.models.registry import load_stage, resolve_model
from services.placement.costs import capacity_meta
from services.net import max_request_bytes
from services.security.mesh_auth import MeshAuthInterceptor, mesh_call_metadata
from services.security.mesh_key import load_mesh_key
from services import tracing
from services.telemetry import setup_logging, start_metrics
from services.wire import codec, shm
from shard_worker.core import WorkerCore
from shard_worker.engine import StageEngine
from shard_worker.placement import AutoPlacer, StageSwitch, choose_initial_span, measure_capacity
from shard_worker.presence import ConsulPresence
from shard_worker.relay import Relay
from shard_worker.servicer import ShardWorkerServicer, add_to_server
from shard_worker.sessions import SessionService, stop_task
from services.transport.pool import PeerPool

log = logging.getLogger("shardmesh.worker")

RPC_HEADROOM = 32
# Consul's blocking queries tell routers about a deregistration within about this long; until then a
# draining worker still accepts new work rather than bouncing it.
DISCOVERY_PROPAGATION_S = 1.0
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"].full_name


async def serve(config: WorkerConfig, fault_injection: str | None = None) -> int:
    if config.threads:
        torch.set_num_threads(config.threads)
    # Resolve first: an unknown model or a bad range fails before the port is taken.
    source = await asyncio.to_thread(resolve_model, config.model)
    capacity = await measure_capacity(config)  # before loading: a calibration must not race the load for the CPU
    if config.auto_layers:  # --layers auto: the range that best covers what Consul shows (docs/placement.md)
        config = await choose_initial_span(config, source, capacity)
    config.span.check_within(source.total_layers, source.model_id)
    mesh_key = load_mesh_key(config.mesh_key_file, os.environ)  # a bad key file fails before the port is taken
    if config.use_shm:
        shm.sweep_dead()  # segments of routers and workers that died on this host (e.g. SIGKILL)

    # Headroom above --max-inflight for health checks, Describe and long-lived streams.
    faults = None
    if fault_injection:  # chaos testing only (shardmesh chaos): injected errors, see services/chaos/interceptor.py
        from services.chaos.interceptor import FaultInjectionInterceptor

        faults = FaultInjectionInterceptor(fault_injection)
    lifecycle = ServerLifecycle(
        "worker", [SERVICE_NAME], config.tls, max_concurrent_rpcs=config.max_inflight + RPC_HEADROOM,
        # mesh identity first: nothing else runs for a caller outside the mesh
        interceptors=[MeshAuthInterceptor(mesh_key, config.tls.verifies_clients), *([faults] if faults else [])],
        max_receive_bytes=max_request_bytes(config.max_tensor_bytes),
    )
    servicer = ShardWorkerServicer(config.max_inflight)
    add_to_server(servicer, lifecycle.server)  # Forward/ForwardStream parse in the handler (corrupt -> INVALID_ARGUMENT)
    lifecycle.install_signal_handlers()
    address = await lifecycle.start(config.listen, config.advertise)
    if config.health_listen:
        await lifecycle.start_health_listener(config.health_listen)
    worker_id = config.resolved_worker_id(address)
    if faults is not None:
        from services.chaos.interceptor import worker_stream_error

        faults.stream_error = worker_stream_error(worker_id, address)
    log.info("worker %s listening on %s; loading %s layers %s", worker_id, address, source.model_id, config.span)

    load = asyncio.create_task(asyncio.to_thread(load_stage, source, config.span))
    stop = asyncio.create_task(lifecycle.wait_for_stop())
    await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
    if stop.done():
        load.cancel()
        await lifecycle.stop(0)
        return 0
    stage = load.result()
    log.info("loaded %d parameters for layers %s", stage.parameter_count(), config.span)

    peers = PeerPool(config.tls if config.tls.enabled else None, metadata=mesh_call_metadata(mesh_key))

    def build_core(stage: StageModel) -> WorkerCore:
        """One stage's engine, sessions and core (again for each move of a --layers auto worker)."""
        engine = StageEngine(
            stage, worker_id, config.max_inflight, max_batch_tokens=config.max_batch_tokens,
            max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
        )
        sessions = None
        if hasattr(stage, "step"):  # llama stages keep per-session KV caches for generation
            sessions = SessionService(
                stage, engine, budget_bytes=config.cache_budget_bytes, default_ttl_s=config.session_ttl_s,
                batching=not config.no_batching,
                prefix_cache=config.prefix_cache, prefix_block_tokens=config.prefix_block_tokens,
            )
        return WorkerCore(
            stage, engine, config.max_tensor_bytes, address, codec.dtype_from_name(config.wire_dtype), Relay(peers, worker_id, config.use_shm, mesh_key), config.use_shm,
            sessions,
        )

    core = build_core(stage)
    sessions = core.sessions
    expiry = sessions.start() if sessions else None
    switch = StageSwitch(core, capacity)  # Describe reports the capacity; a move swaps the core behind it
    servicer.attach(switch)  # type: ignore[arg-type]
    await lifecycle.set_serving(True)
    presence = None
    if config.consul is not None:
        presence = ConsulPresence(
            config.consul,
            worker_id=worker_id,
            advertise=address,
            source=source,
            span=config.span,
            max_inflight=config.max_inflight,
            health_listen=config.health_listen,
            tls=config.tls.enabled,
            extra_meta=capacity_meta(capacity.speed, capacity.memory_bytes, config.auto_layers),
        )
        presence.start()
    placer = None
    if config.auto_layers and presence is not None:
        placer = AutoPlacer(switch, presence, build_core, source, config, worker_id)
        placer.start()
    start_metrics(config.metrics_listen)
    log.info("worker %s SERVING layers %s of %s (checksum %s)", worker_id, config.span, source.model_id, source.checksum[:12])

    await stop
    log.info(
        "worker %s draining: NOT_SERVING, finishing %d in-flight requests and %d open sessions",
        worker_id, core.active, sessions.store.count if sessions else 0,
    )
    await lifecycle.set_serving(False)
    if placer is not None:
        await placer.close()  # no move starts during the drain
    if presence is not None:
        await presence.stop()  # routers stop sending here before the drain, not after
        await asyncio.sleep(DISCOVERY_PROPAGATION_S)  # ...and see the deregistration before new work is refused
    drained = await switch.drain(config.grace_s)  # computes, relayed requests and open sessions
    if not drained:
        log.warning(
            "grace period of %.1fs ended with %d requests in flight and %d sessions open",
            config.grace_s, core.active, sessions.store.count if sessions else 0,
        )
    await lifecycle.stop(0.5)
    await stop_task(expiry)
    await peers.close()
    switch.close()
    shm.sweep_own()  # segments this worker wrote that no peer consumed
    log.info("worker %s stopped", worker_id)
    return 0


def run(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    config = WorkerConfig.from_args(args)
    setup_logging(config.log_level, "worker", config.log_format)
    tracing.configure(config.tracing, "shardmesh-worker")  # off unless --trace-sample-ratio > 0 (imports nothing then)
    return asyncio.run(serve(config, fault_injection=getattr(args, "fault_injection", None)))
