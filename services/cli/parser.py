"""The ``shardmesh`` argument parser: every flag of every subcommand, in one place.

The Helm chart renders these flags; ``tests/helm`` checks each rendered container command against
``shardmesh <cmd> --help``, so a flag renamed here without the chart fails CI.
"""

from __future__ import annotations

import argparse

DEFAULT_ROUTER_LISTEN = "127.0.0.1:50050"


def _add_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (all three files enable mutual TLS; cert+key alone enable server TLS)")
    g.add_argument("--tls-cert", metavar="FILE", help="PEM certificate this server presents")
    g.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle used to verify peers")


def _add_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None,
                   help="bearer token for a router with --auth-tokens-file (default: $SHARDMESH_TOKEN)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text (default): one readable line per event; json: one JSON object per line with ts, level, "
                        "component, logger, msg, and request_id/trace_id on lines about a request (docs/observability.md)")
    p.add_argument("--health-listen", metavar="HOST:PORT",
                   help="extra plaintext listener serving only grpc.health.v1 (for kubelet probes when TLS is on)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")


def _add_tracing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracing (OpenTelemetry; see README, Tracing)")
    g.add_argument("--trace-sample-ratio", type=float, default=None, metavar="RATIO",
                   help="fraction of requests traced, 0..1 (default: $SHARDMESH_TRACE_SAMPLE_RATIO, else 0 = off, no "
                        "cost). Routers sample; on workers any value > 0 turns tracing on and they follow the router's "
                        "decision carried in each message's traceparent")
    g.add_argument("--otlp-endpoint", metavar="URL",
                   help="OTLP/gRPC collector for spans (default: $OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317); "
                        "$SHARDMESH_TRACE_FILE=PATH writes JSON lines to PATH instead")


def _add_mesh_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh-key-file", metavar="FILE",
                   help="shared secret of this mesh (32+ random bytes or 64+ hex digits; default: "
                        "$SHARDMESH_MESH_KEY_FILE): the router signs relay routes with it and workers relay only along "
                        "signed routes. Without it workers relay only to loopback peers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmesh",
        description="Serve one PyTorch model split across shard-worker processes, through a gRPC router.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run a shard worker for one layer range")
    w.add_argument("--model", required=True, help="built-in name (minilm, tiny-llama, smollm2) or a model directory")
    w.add_argument("--layers", required=True, metavar="START:END|auto",
                   help="half-open layer range this worker holds; auto (with Consul) = choose the range that best "
                        "covers the weakest layers of the workers already registered, and move when one leaves "
                        "(see docs/placement.md)")
    w.add_argument("--listen", required=True, metavar="HOST:PORT", help="gRPC listen address (port 0 = pick a free port)")
    w.add_argument("--advertise", metavar="HOST:PORT",
                   help="address this worker registers in Consul and reports in Describe; it does not change the bind. "
                        "Routers using Consul dial it; static:// routers dial the address they were given. "
                        "Default: the --listen host with the bound port; for a wildcard --listen (0.0.0.0, ::) the "
                        "host's default-route address (loopback if it has none)")
    w.add_argument("--worker-id", help="stable id for this instance (default: derived from host, port and layers)")
    w.add_argument("--max-inflight", type=int, default=64, help="requests admitted at once; more get RESOURCE_EXHAUSTED")
    w.add_argument("--max-tensor-mb", type=int, default=256, help="largest tensor accepted from the wire, in MiB")
    w.add_argument("--max-batch-tokens", type=int, default=32768,
                   help="largest batch x tokens of one request (bounds its memory and compute time); more gets "
                        "INVALID_ARGUMENT naming the limit")
    w.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, seconds to finish in-flight requests")
    w.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    w.add_argument("--wire-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of activations this worker sends (reduced = half the bytes, bounded error)")
    w.add_argument("--no-shm", action="store_true",
                   help="never use shared memory for large activations to co-located peers (send bytes, chunked)")
    w.add_argument("--cache-budget-mb", type=int, default=512, help="KV-cache budget for generation sessions, in MiB")
    w.add_argument("--no-batching", action="store_true",
                   help="run each session's decode step alone (bit-exact with one process; slower with many sessions)")
    w.add_argument("--session-ttl-s", type=float, default=300.0, help="idle generation sessions expire after this")
    w.add_argument("--no-prefix-cache", action="store_true",
                   help="keep no KV blocks of prompt prefixes for later sessions (automatic prefix caching is on by "
                        "default, within --cache-budget-mb, evicted least recently used before a session is refused; "
                        "--no-batching turns it off too)")
    w.add_argument("--prefix-block-tokens", type=int, default=16,
                   help="prompt positions per prefix-cache block: a new session reuses whole blocks it shares")
    wb = w.add_argument_group("dynamic batching (stateless forwards)")
    wb.add_argument("--max-batch-size", type=int, default=1, metavar="N",
                    help="sequences run together in one forward: queued requests for this stage are batched up to N "
                         "(padding bounded: lengths within 25%% or 8 tokens), then split back; outputs then differ "
                         "from solo ones by float rounding only (docs/architecture.md). Default 1 = off: every "
                         "output bit-identical to one process. 8 serves many concurrent clients best")
    wb.add_argument("--max-queue-delay-us", type=int, default=0, metavar="US",
                    help="how long a request may wait for batch-mates before its forward starts; 0 = only batch "
                         "what is already queued when the compute frees (continuous batching, no added latency)")
    w.add_argument("--fault-injection", metavar="FILE",
                   help="chaos testing only: fail a share of calls as a JSON control FILE says (see docs/chaos.md)")
    pl = w.add_argument_group("capacity and placement (see docs/placement.md)")
    pl.add_argument("--capacity", type=float, default=0.0, metavar="SPEED",
                    help="relative compute speed this worker declares (1.0 = the reference calibration); reported in "
                         "Describe and Consul Meta. 0 = measure it with a short calibration at start (~0.3 s)")
    pl.add_argument("--capacity-memory-mb", type=float, default=0.0, metavar="MB",
                    help="memory this worker offers for weights, reported like --capacity; --layers auto never picks "
                         "a range whose weights exceed it. 0 = the memory the OS reports available")
    pl.add_argument("--rebalance-interval-s", type=float, default=10.0, metavar="S",
                    help="--layers auto: how often the worker checks coverage, and the least time between two of its "
                         "moves")
    c = w.add_argument_group("Consul registration")
    c.add_argument("--consul", metavar="HOST:PORT", help="register with this Consul agent (default: $CONSUL_HTTP_ADDR)")
    c.add_argument("--consul-service", default="shardmesh-worker", help="Consul service name")
    c.add_argument("--consul-check", choices=["grpc", "ttl"], default="grpc",
                   help="health check kind: the agent calls grpc.health.v1, or the worker sends TTL heartbeats")
    c.add_argument("--consul-tag", action="append", default=[], metavar="TAG", help="extra service tag (repeatable)")
    c.add_argument("--no-consul-register", action="store_true",
                   help="do not self-register (the platform registers pods, e.g. consul-k8s)")
    _add_tls(w)
    _add_mesh_key(w)
    _add_common(w)
    _add_tracing(w)

    r = sub.add_parser("router", help="run the router")
    r.add_argument("--listen", default=DEFAULT_ROUTER_LISTEN, metavar="HOST:PORT", help="gRPC listen address")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--workers", metavar="HOST:PORT,...", help="static discovery: the workers' addresses")
    src.add_argument("--discovery", metavar="URL",
                     help="static://HOST:PORT,... or consul://HOST:PORT[?service=NAME] (consul:// alone uses $CONSUL_HTTP_ADDR)")
    r.add_argument("--mode", choices=["direct", "relay"], default="direct", help="default activation path")
    r.add_argument("--model", help="tokenizer source (default: the model the workers describe)")
    r.add_argument("--request-timeout-s", type=float, default=30.0, help="deadline for a request without one")
    r.add_argument("--hop-timeout-ms", type=int, default=5000, help="deadline for one hop; a hung worker is detected by it")
    r.add_argument("--max-attempts", type=int, default=3, help="attempts per hop before the request fails")
    r.add_argument("--retry-budget", type=float, default=0.2, help="retries allowed as a share of active requests")
    r.add_argument("--route-wait-s", type=float, default=10.0, metavar="S",
                   help="a request that finds no replica for some layers (their last worker left or restarts) waits "
                        "up to S seconds, within its deadline, for coverage to return, re-planning on every topology "
                        "change; 0 = fail at once with UNAVAILABLE (see docs/placement.md)")
    r.add_argument("--eject-after-failures", type=int, default=5,
                   help="consecutive failures (errors or hop timeouts) that eject a worker from routing")
    r.add_argument("--eject-base-s", type=float, default=30.0,
                   help="first ejection time; each further ejection lasts longer; re-admitted after a passing health probe")
    r.add_argument("--hedge-after-ms", type=int, default=0, help="send a duplicate to a second replica after this (0 = off)")
    r.add_argument("--hedge-delay", choices=["p95", "fixed"], default="p95",
                   help="p95: hedge once a hop is slower than its recent p95 latency, never sooner than --hedge-after-ms;"
                        " fixed: hedge after exactly --hedge-after-ms (duplicates most hops when it is short)")
    r.add_argument("--max-inflight", type=int, default=256, help="requests admitted at once; more get RESOURCE_EXHAUSTED")
    r.add_argument("--max-tensor-mb", type=int, default=256, help="largest tensor accepted from clients, in MiB")
    r.add_argument("--wire-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of activations sent to workers")
    r.add_argument("--no-shm", action="store_true",
                   help="never use shared memory for large activations to co-located workers (send bytes, chunked)")
    r.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, seconds to finish in-flight requests")
    r.add_argument("--fault-injection", metavar="FILE",
                   help="chaos testing only: fail a share of calls as a JSON control FILE says (see docs/chaos.md)")
    r.add_argument("--max-text-bytes", type=int, default=1024 * 1024,
                   help="largest text input (UTF-8 bytes) the router tokenises; longer gets INVALID_ARGUMENT")
    a = r.add_argument_group("client authentication (see docs/security.md)")
    a.add_argument("--auth-tokens-file", metavar="FILE",
                   help="YAML/JSON file of bearer token -> tenant (optional per-tenant limits); reloaded when it changes. "
                        "Clients without a known token get UNAUTHENTICATED (health and reflection stay open)")
    a.add_argument("--rate-limit-rps", type=float, default=0.0,
                   help="requests per second allowed to each tenant (0 = no limit); more get RESOURCE_EXHAUSTED")
    bal = r.add_argument_group("balancing and result cache (see README, Balancing)")
    bal.add_argument("--balancer", default="p2c",
                     choices=["round_robin", "least_connections", "least_response_time", "p2c", "weighted"],
                     help="how a stage's replica is chosen: p2c = power of two choices over EWMA latency x load "
                          "(default); round_robin = in turn; least_connections = fewest outstanding; "
                          "least_response_time = lowest EWMA latency x (outstanding + 1) of all; weighted = at random "
                          "in proportion to reported speed (else 1 / EWMA latency)")
    bal.add_argument("--cache-mb", type=float, default=0.0,
                     help="Infer result cache size in MiB, LRU, keyed by model checksum, token ids and mask "
                          "(0 = off); a hit answers with the stored output, an empty route and attempts 0")
    cb = r.add_argument_group("coalescing: router-side batching (see docs/architecture.md)")
    cb.add_argument("--coalesce", type=int, default=0, metavar="N",
                    help="send Infer requests that wait for the pipeline as one batch of up to N (one message per hop "
                         "instead of N; cuts per-message CPU on small hosts). A request goes alone while fewer than "
                         "--coalesce-depth batches are in flight. Batched outputs are within the batching bound, not "
                         "bit-identical (docs/architecture.md). 0 = off (default)")
    cb.add_argument("--coalesce-depth", type=int, default=0, metavar="D",
                    help="--coalesce: batches in flight before requests wait to be coalesced; 0 = the route's stage "
                         "count + 1")
    sc = r.add_argument_group("scheduling (see docs/scheduling.md)")
    sc.add_argument("--schedule", choices=["fcfs", "priority", "mlfq", "fair"], default="fcfs",
                    help="order of requests waiting for a pipeline slot: fcfs = arrival (a generation holds its slot "
                         "to the end); priority = strict levels; mlfq = levels, then a multi-level feedback queue that "
                         "demotes generation sessions as they produce tokens; fair = levels, then weighted fair "
                         "queuing across tenants (--tenant-weights). All but fcfs schedule each generation step")
    sc.add_argument("--max-concurrency", type=int, default=0, metavar="N",
                    help="requests (or generation steps) running through the workers at once; the rest wait in the "
                         "scheduler's queues. 0 = 64 per replica of the narrowest stage (the workers' default "
                         "--max-inflight), at most --max-inflight")
    sc.add_argument("--priority-levels", type=int, default=3, metavar="N",
                    help="priority levels 1 (highest) .. N; a request's priority field or x-shardmesh-priority "
                         "metadata picks one (the field wins when both are set); 0 or unset = --default-priority")
    sc.add_argument("--default-priority", type=int, default=2, metavar="LEVEL",
                    help="level of requests that send priority 0 or none")
    sc.add_argument("--queue-size", type=int, default=128, metavar="N",
                    help="new requests waiting per priority level; more get RESOURCE_EXHAUSTED naming the queue")
    sc.add_argument("--queue-timeout-ms", type=int, default=0, metavar="MS",
                    help="longest wait for a slot before RESOURCE_EXHAUSTED (0 = up to the request's deadline)")
    sc.add_argument("--no-deadline-admission", action="store_true",
                    help="admit requests whose deadline is shorter than the expected service time (EWMA of recent "
                         "requests) plus queue wait; by default they get DEADLINE_EXCEEDED at once")
    sc.add_argument("--tenant-weights", metavar="SPEC|FILE",
                    help="fair: weights per tenant, TENANT=WEIGHT,... (e.g. a=3,b=1) or a file with one TENANT=WEIGHT "
                         "per line; others weigh 1. Tenant = the authenticated one, else x-shardmesh-tenant metadata")
    sc.add_argument("--mlfq-quantum", type=int, default=8, metavar="TOKENS",
                    help="mlfq: tokens a session produces on level 0; each lower level holds twice as many")
    sc.add_argument("--mlfq-levels", type=int, default=4, metavar="N", help="mlfq: feedback levels")
    sc.add_argument("--mlfq-boost-ms", type=int, default=1000, metavar="MS",
                    help="mlfq: a step waiting this long is served as if on the top level (no starvation)")
    _add_tls(r)
    _add_mesh_key(r)
    _add_common(r)
    _add_tracing(r)

    u = sub.add_parser("up", help="start a local mesh (router + workers) from a YAML file")
    u.add_argument("config", metavar="CONFIG.yaml")
    u.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    i = sub.add_parser("infer", help="send inputs to a router and print the outputs")
    i.add_argument("--router", default=DEFAULT_ROUTER_LISTEN, metavar="HOST:PORT")
    i.add_argument("--json", action="store_true", help="one JSON object per input: output, route, mode, hops_ms")
    i.add_argument("--mode", choices=["direct", "relay"], help="activation path (default: the router's)")
    i.add_argument("--timeout-s", type=float, default=60.0)
    i.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle to verify the router (enables TLS)")
    i.add_argument("--tls-cert", metavar="FILE", help="client certificate, when the router requires mutual TLS")
    i.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    _add_token(i)
    i.add_argument("text", nargs="+", metavar="TEXT")

    d = sub.add_parser("demo", help="start a local 3-worker mesh, compare with the single-process model, stop")
    d.add_argument("--model", default="minilm", help="model for the demo (default: minilm)")
    d.add_argument("--generate", action="store_true", help="demo sharded text generation instead (smollm2)")
    d.add_argument("--mode", choices=["direct", "relay"], default="direct")

    b = sub.add_parser("bench", help="benchmark the mesh side by side with the single-process model and a peer")
    b.add_argument("suite", nargs="?", default="infer", choices=["infer", "failover", "generate", "placement", "schedule", "balance"])
    b.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="draw the results")
    b.add_argument("--quick", action="store_true", help="tiny configuration (for tests)")
    b.add_argument("--requests", type=int, default=0, help="requests per configuration (0 = suite default)")
    b.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")
    b.add_argument("--rounds", type=int, default=0,
                   help="infer suite: run every system this many times, interleaved in a rotating order, and report "
                        "each row's per-round spread (0 = suite default: 3; 1 with --quick)")
    b.add_argument("--batching", metavar="SIZES",
                   help="infer suite: the dynamic-batching comparison instead of the usual workloads: minilm on "
                        "14-token texts through mesh-direct once per worker --max-batch-size in SIZES (e.g. 1,8; "
                        "1 = off), beside the single process at batch 1, at concurrency 1,16 unless given; "
                        "prints throughput and p50 ratios against the issue's targets")

    pn = sub.add_parser("plan", help="print capacity-proportional layer ranges for N workers beside the even split")
    pn.add_argument("--model", required=True, help="built-in name (minilm, tiny-llama, smollm2) or a model directory")
    pn.add_argument("--workers", type=int, required=True, metavar="N", help="number of workers to place layers on")
    pn.add_argument("--capacity", metavar="S1,S2,...",
                    help="relative speed of each worker (default: all 1.0); e.g. 2,1,1 = the first is twice as fast")
    pn.add_argument("--memory-mb", metavar="M1,M2,...", help="memory of each worker for weights, in MiB (default: unbounded)")
    pn.add_argument("--bandwidth-mbps", type=float, default=0.0,
                    help="link bandwidth of every worker in MB/s for activations (0 = free: shared memory on one host)")
    pn.add_argument("--replicas", type=int, default=1, help="replica groups, each covering every layer once")
    pn.add_argument("--hop-ms", type=float, default=0.0, help="fixed cost of one hop (RPC and serialisation), in ms")
    pn.add_argument("--measure", action="store_true",
                    help="measure per-layer costs on this machine now (and cache them per model, dtype, shape, threads and host); "
                         "without it, cached measurements are used if present, else equal layers")
    pn.add_argument("--shape", default="1x128", metavar="BxT", help="batch x tokens the costs are measured at")
    pn.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    g = sub.add_parser("generate", help="generate text through a router, streaming tokens")
    g.add_argument("--router", default=DEFAULT_ROUTER_LISTEN, metavar="HOST:PORT")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", choices=["direct", "relay"])
    g.add_argument("--json", action="store_true", help="print one object at the end: text, token_ids, ttft_ms, tokens_per_s, route")
    g.add_argument("--timeout-s", type=float, default=120.0)
    g.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle to verify the router (enables TLS)")
    g.add_argument("--tls-cert", metavar="FILE", help="client certificate, when the router requires mutual TLS")
    g.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    _add_token(g)
    g.add_argument("prompt", metavar="PROMPT")

    ch = sub.add_parser("chaos", help="run chaos scenarios against a local mesh and check the recorded history")
    ch.add_argument("scenarios", nargs="+", metavar="SCENARIO.yaml", help="scenario files (see docs/chaos/)")
    ch.add_argument("--json", dest="json_path", metavar="FILE", help="write results and histories as JSON")
    ch.add_argument("--plot", metavar="FILE.png", help="timeline per scenario (several scenarios: FILE-NAME.png)")
    ch.add_argument("--markdown", metavar="FILE", help="write the report table as markdown")
    ch.add_argument("--history-dir", metavar="DIR", help="write each scenario's history as DIR/NAME.jsonl")
    ch.add_argument("--check-only", action="store_true", help="validate the scenario files and exit")
    ch.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    cv = sub.add_parser("convert", help="convert a built-in model (smollm2) to a safetensors directory")
    cv.add_argument("model", help="built-in model name, e.g. smollm2")
    cv.add_argument("out_dir", metavar="OUT_DIR")
    return parser
