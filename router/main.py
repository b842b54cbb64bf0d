"""``shardmesh router``: discover workers, plan routes, serve Infer; drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time

import grpc

from services.config import RouterConfig
from services.discovery.base import Discovery
from services.discovery.url import build_discovery, parse_discovery
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.lifecycle import ServerLifecycle
from services.transport.raw import add_parsing_servicer
from services.net import max_request_bytes
from services.security.client_auth import CURRENT_TENANT, build_client_auth
from services.security.mesh_auth import mesh_call_metadata
from services.memory import limit_malloc_arenas
from services import tracing
from services.telemetry import setup_logging, start_metrics
from services.security.mesh_key import load_mesh_key
from services.wire import codec, shm
from router.core import RouterCore
from router.generation import GenerationService
from router.oip import OIP_METHODS, OIP_SERVICE_NAME, OipServicer, add_oip_servicer
from router.peers import WorkerPool
from router.pipeline import Pipeline, PipelineSettings
from router.planning.balancers import Balancer
from router.planning.outlier import OutlierConfig, OutlierDetector
from router.planning.retry_budget import RetryBudget
from router.planning.types import WorkerInfo
from router.result_cache import ResultCache
from router.scheduling import SchedulerSettings
from router.servicer import RouterServicer
from router.topology import Topology

log = logging.getLogger("shardmesh.router")

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
ROUTER_METHODS = tuple(m.name for m in router_pb2.DESCRIPTOR.services_by_name["Router"].methods)
# Concurrent RPCs beyond --max-inflight: health checks, Topology and long-lived streams.
RPC_HEADROOM = 32
PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 0.5


async def probe_ejected(outliers: OutlierDetector, topology: Topology, pool: WorkerPool) -> None:
    """Actively probes ejected workers (grpc.health.v1) and re-admits those that answer SERVING."""
    while True:
        await asyncio.sleep(PROBE_INTERVAL_S)
        by_id = {w.worker_id: w for w in topology.workers}
        for worker_id in outliers.due_for_probe(time.monotonic()):
            worker = by_id.get(worker_id)
            if worker is None:
                outliers.forget(worker_id)
                continue
            if await pool.is_serving(worker.address, PROBE_TIMEOUT_S):
                log.info("worker %s answers SERVING again; re-admitted", worker_id)
                outliers.readmit(worker_id, time.monotonic())
            else:
                outliers.record_probe_failure(worker_id, time.monotonic())


async def serve(config: RouterConfig, discovery: Discovery | None = None, fault_injection: str | None = None) -> int:
    mesh_key = load_mesh_key(config.mesh_key_file, config.env)  # a bad key file fails before the port is taken
    if config.use_shm:
        shm.sweep_dead()  # segments of routers and workers that died on this host (e.g. SIGKILL)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    auth = build_client_auth(
        config.auth_tokens_file, config.tls.verifies_clients, config.rate_limit_rps, ROUTER_METHODS + OIP_METHODS
    )
    if auth is not None:  # first: nothing else runs for a caller it refuses
        interceptors.append(auth)
    if fault_injection:  # chaos testing only (shardmesh chaos): injected errors, see services/chaos/interceptor.py
        from services.chaos.interceptor import FaultInjectionInterceptor

        interceptors.append(FaultInjectionInterceptor(fault_injection))
    lifecycle = ServerLifecycle(
        "router", [SERVICE_NAME, OIP_SERVICE_NAME], config.tls, interceptors=interceptors,
        # calls and streams are admitted separately (health never refused): at most --max-inflight streams
        max_concurrent_rpcs=config.max_inflight + RPC_HEADROOM, max_streams=config.max_inflight,
        max_receive_bytes=max_request_bytes(config.max_tensor_bytes, config.max_text_bytes),
    )
    lifecycle.install_signal_handlers()
    pool = WorkerPool(config.tls if config.tls.enabled else None, metadata=mesh_call_metadata(mesh_key))
    discovery = discovery or build_discovery(parse_discovery(config.discovery, config.env))

    async def on_change(complete: bool, joined: list[WorkerInfo]) -> None:
        for worker in joined:  # a restarted worker starts with a clean record
            outliers.forget(worker.worker_id)
        await lifecycle.set_serving(complete)
        if complete:
            log.info("route complete: %s", topology.plan().describe())
        else:
            log.warning("no complete route: %s", topology.last_problem)

    outliers = OutlierDetector(
        OutlierConfig(consecutive_failures=config.eject_after_failures, base_ejection_s=config.eject_base_s)
    )
    topology = Topology(discovery, pool, on_change)
    pipeline = Pipeline(
        topology,
        pool,
        PipelineSettings(
            hop_timeout_s=config.hop_timeout_s, max_attempts=config.max_attempts, hedge_after_s=config.hedge_after_s, hedge_fixed=config.hedge_fixed,
            use_shm=config.use_shm, mesh_key=mesh_key, route_wait_s=config.route_wait_s,
            wire_dtype=codec.wire_dtype(codec.dtype_from_name(config.wire_dtype)) if config.wire_dtype != "float32" else 0,
        ),
        outliers,
        RetryBudget(ratio=config.retry_budget),
        balancer=Balancer(config.balancer),
    )
    generation = GenerationService(topology, pool, pipeline, config.max_attempts)
    core = RouterCore(
        topology,
        pipeline,
        default_mode=config.mode,
        request_timeout_s=config.request_timeout_s,
        max_inflight=config.max_inflight,
        max_tensor_bytes=config.max_tensor_bytes,
        tokenizer_model=config.model,
        generation=generation,
        scheduling=SchedulerSettings.from_config(config.scheduling),  # --schedule group (docs/scheduling.md)
        result_cache=ResultCache(config.result_cache_bytes, export=True) if config.result_cache_bytes else None,
        coalesce=config.coalesce,
        coalesce_depth=config.coalesce_depth,
    )
    charge = (lambda: auth.charge(CURRENT_TENANT.get())) if auth is not None else None
    servicer = RouterServicer(
        core, config.max_inflight, max_text_bytes=config.max_text_bytes, charge_stream_request=charge
    )
    # Infer/InferStream parse in the handler: a corrupt message is INVALID_ARGUMENT, not gRPC's UNKNOWN.
    add_parsing_servicer(
        router_pb2_grpc.add_RouterServicer_to_server, servicer, lifecycle.server,
        {"Infer": router_pb2.InferRequest, "InferStream": router_pb2.InferRequest},
    )
    # Open Inference Protocol (KServe v2 + Triton's ModelStreamInfer) beside shardmesh.v1.Router: router/oip.py
    add_oip_servicer(
        OipServicer(core, configured_model=config.model, max_text_bytes=config.max_text_bytes,
                    max_stream_pending=config.max_inflight, charge_stream_request=charge),
        lifecycle.server,
    )
    await lifecycle.start(config.listen)
    if config.health_listen:
        await lifecycle.start_health_listener(config.health_listen)
    start_metrics(config.metrics_listen)
    await topology.start()
    prober = asyncio.create_task(probe_ejected(outliers, topology, pool), name="prober")
    log.info("router listening on %s, discovery %s, default mode %s", lifecycle.address, discovery.name, config.mode)
    try:
        await lifecycle.wait_for_stop()
    finally:
        log.info("router stopping: finishing %d in-flight requests", core.inflight)
        await lifecycle.set_serving(False)
        prober.cancel()
        with contextlib.suppress(BaseException):
            await prober
        await lifecycle.stop(config.grace_s)
        await generation.aclose()  # CloseSession calls still running: sessions are not left on workers
        await topology.close()
        await pool.close()
    return 0


def run(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    config = RouterConfig.from_args(args)
    setup_logging(config.log_level, "router", config.log_format)
    tracing.configure(config.tracing, "shardmesh-router")  # off unless --trace-sample-ratio > 0 (imports nothing then)
    return asyncio.run(serve(config, fault_injection=getattr(args, "fault_injection", None)))
