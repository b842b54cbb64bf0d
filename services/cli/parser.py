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
    p.add_argument("--health-listen", metavar="HOST:PORT",
                   help="extra plaintext listener serving only grpc.health.v1 (for kubelet probes when TLS is on)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")


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
    _add_tls(r)
    _add_mesh_key(r)
    _add_common(r)

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
    b.add_argument("suite", nargs="?", default="infer", choices=["infer", "failover", "generate", "placement"])
    b.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="draw the results")
    b.add_argument("--quick", action="store_true", help="tiny configuration (for tests)")
    b.add_argument("--requests", type=int, default=0, help="requests per configuration (0 = suite default)")
    b.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")

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
