"""The built image, run the way the Helm chart runs it: a router and three workers as podman containers.

Each container is made from the chart's own rendering (tests/image/pods.py translates the pod spec): non-root
UID, read-only root filesystem, /cache and /tmp as emptyDir volumes, all capabilities dropped, the chart's
default mutual TLS and mesh key from the Secrets it generates, static discovery by per-pod DNS name. The
probes' grpc.health.v1 port answers from the host; `shardmesh infer` from the host gets exactly what the
single-process model (sentence-transformers' own `encode`) computes; SIGTERM ends every container cleanly
within its grace period. The weights init container (`shardmesh convert smollm2`) runs as the chart runs it.

Needs podman and the image (scripts/image.sh build); skipped with the reason otherwise.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.image.pods import IMAGE, PodmanCluster, podman, podman_missing_reason

REASON = podman_missing_reason()
pytestmark = [
    pytest.mark.image,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(REASON is not None, reason=f"image tests: {REASON}"),
]

SENTENCES = [
    "Sharded inference must equal the single-process model.",
    "Short one.",
    "A somewhat longer sentence that talks about routers, shard workers, activations and Consul discovery.",
]
# Chart defaults (TLS, mesh key, probes, security context, volumes) with one router and three single-replica
# shard groups over minilm's 6 layers.
MESH_VALUES: dict[str, Any] = {
    "router": {"replicas": 1},
    "shards": [
        {"name": "s0", "layers": "0:2", "replicas": 1},
        {"name": "s1", "layers": "2:4", "replicas": 1},
        {"name": "s2", "layers": "4:6", "replicas": 1},
    ],
}


def _render(values: dict[str, Any]):  # type: ignore[no-untyped-def]
    import helm_python as helm

    from tests.helm.rendering import CHART_DIR, render

    with helm.Chart.load(CHART_DIR) as chart:
        return render(chart, values)


def _secrets(release) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    return {s["metadata"]["name"]: s for s in release.of_kind("Secret")}


def _wait_serving(address: str, timeout_s: float) -> float:
    """Polls grpc.health.v1 Check(service="") as the kubelet's gRPC probe does; returns the seconds it took."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - start < timeout_s:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"{address}: grpc.health.v1 not SERVING within {timeout_s:.0f} s")


def _startup_budget_s(container: dict[str, Any]) -> float:
    probe = container["startupProbe"]
    return float(probe["periodSeconds"]) * float(probe["failureThreshold"])


@pytest.fixture(scope="module")
def sentence_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    from services.models.registry import resolve_model

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")


@pytest.fixture
def cluster() -> Iterator[PodmanCluster]:
    created = PodmanCluster(Path(tempfile.mkdtemp(prefix="shardmesh-image-test-", dir="/var/tmp")))
    try:
        yield created
    finally:
        created.close()


def test_image_user_and_entrypoint_match_the_chart() -> None:
    release = _render(MESH_VALUES)
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    sc = release.values["podSecurityContext"]
    assert config["User"] == f"{sc['runAsUser']}:{sc['runAsGroup']}"
    assert config["Entrypoint"] == ["shardmesh"]
    env = dict(e.split("=", 1) for e in config["Env"])
    cache = release.values["cache"]["path"]
    assert (env["SHARDMESH_CACHE"], env["HF_HOME"], env["HF_HUB_OFFLINE"]) == (cache, f"{cache}/huggingface", "1")
    ports = {release.values[c][k] for c in ("router", "worker") for k in ("port", "metricsPort", "healthPort")}
    assert {int(p.split("/")[0]) for p in config["ExposedPorts"]} == ports


def test_container_mesh_serves_exact_outputs_and_stops_on_sigterm(cluster: PodmanCluster, sentence_model) -> None:  # type: ignore[no-untyped-def]
    import torch

    release = _render(MESH_VALUES)
    secrets = _secrets(release)
    namespace, domain = "ml", release.values["clusterDomain"]

    # Addresses first: every container gets the whole table of per-pod and Service DNS names.
    plan = []
    for sts in release.statefulsets:
        group = sts["metadata"]["name"]
        pod_name = f"{group}-0"
        ip = cluster.allocate(pod_name, [f"{pod_name}.{group}.{namespace}.svc.{domain}"])
        plan.append((pod_name, sts["spec"]["template"]["spec"], ip))
    router_obj = release.router
    router_name = router_obj["metadata"]["name"]
    router_ip = cluster.allocate(
        f"{router_name}-0",
        [router_name, f"{router_name}.{namespace}", f"{router_name}.{namespace}.svc", f"{router_name}.{namespace}.svc.{domain}"],
    )
    router_spec = router_obj["spec"]["template"]["spec"]

    workers = []
    for pod_name, spec, ip in plan:
        (main,) = spec["containers"]
        assert "initContainers" not in spec  # weights.source=image: the minilm weights ship in the image
        workers.append(cluster.run(pod_name, spec, main, secrets, ip))
    (router_main,) = router_spec["containers"]
    router_port = int(next(p["containerPort"] for p in router_main["ports"] if p["name"] == "grpc"))
    router = cluster.run(f"{router_name}-0", router_spec, router_main, secrets, router_ip, publish=(router_port,))

    try:
        # Probes: the health-only port (TLS is on by default), from the host as the kubelet probes from the node.
        started = time.monotonic()
        for pod in [*workers, router]:
            health = pod.probe_port()
            assert health != next(p["containerPort"] for p in pod.main["ports"] if p["name"] == "grpc")
            try:
                _wait_serving(f"{pod.ip}:{health}", _startup_budget_s(pod.main))
            except AssertionError:
                raise AssertionError(f"{pod.name} never became SERVING:\n{cluster.logs(pod)}") from None
        print(f"all four containers SERVING {time.monotonic() - started:.1f} s after the last start")

        # What the container really got: the chart's user, no capabilities, a read-only root, writable volumes.
        probe = (
            "import os, errno\n"
            "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm'))]\n"
            "print(os.getuid(), os.getgid(), 10001 in os.getgroups(), caps)\n"
            "for d in ('/', '/home/shardmesh', '/opt/shardmesh'):\n"
            "    try: open(d + '/probe', 'w'); print('writable', d)\n"
            "    except OSError as e: assert e.errno == errno.EROFS, (d, e)\n"
            "for d in ('/tmp', os.environ['SHARDMESH_CACHE']): open(d + '/probe', 'w').close()\n"
        )
        seen = podman("exec", workers[0].container, "python", "-c", probe).stdout.split()
        assert seen == ["10001", "10001", "True", "['0000000000000000',", "'0000000000000000']"], seen

        # `shardmesh infer` from the host through the published router port, with the client certificate the
        # chart generates (the router's certificate names 127.0.0.1, as for kubectl port-forward).
        client_dir = cluster.root / "client"
        client_dir.mkdir()
        tls = secrets[f"{release.values.get('fullnameOverride') or 'demo-shardmesh'}-client-tls"]["data"]
        for key in ("ca.crt", "tls.crt", "tls.key"):
            (client_dir / key).write_bytes(base64.b64decode(tls[key]))
        cmd = [
            sys.executable, "-m", "services.cli.main", "infer", "--router", f"127.0.0.1:{router.published[router_port]}",
            "--json", "--timeout-s", "60", "--tls-ca", str(client_dir / "ca.crt"),
            "--tls-cert", str(client_dir / "tls.crt"), "--tls-key", str(client_dir / "tls.key"), *SENTENCES,
        ]
        deadline = time.monotonic() + 60
        while True:  # the router is SERVING once it runs; its route may complete a moment later
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert proc.returncode == 0, f"infer failed: {proc.stderr}\nrouter log:\n{cluster.logs(router)}"
        objects = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        assert len(objects) == len(SENTENCES)
        for text, obj in zip(SENTENCES, objects):
            expected = sentence_model.encode(text, convert_to_tensor=True)
            assert torch.equal(torch.tensor(obj["output"], dtype=torch.float32), expected), text
            assert obj["route"] == [pod.name for pod in workers], obj["route"]

        # The chart's `helm test` pod, as a container: `shardmesh infer` against the router Service's DNS name.
        test_pod = release.test_pod
        (test_main,) = test_pod["spec"]["containers"]
        test_ip = cluster.allocate(test_pod["metadata"]["name"])
        done = cluster.run(test_pod["metadata"]["name"], test_pod["spec"], test_main, secrets, test_ip, detach=False, timeout=300)
        assert done.returncode == 0, f"helm test pod failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    finally:
        # SIGTERM to every container; each must exit 0 within terminationGracePeriodSeconds (no SIGKILL).
        results = {}
        for pod in [router, *workers]:
            results[pod.name] = (*cluster.stop(pod), pod.grace_s)
    print("SIGTERM -> exit:", {name: f"{code} in {elapsed:.1f} s" for name, (code, elapsed, _) in results.items()})
    for name, (code, elapsed, grace) in results.items():
        assert code == 0 and elapsed < grace, f"{name}: exit code {code} after {elapsed:.1f} s (grace {grace} s)"


def test_weights_init_container_converts_smollm2_and_the_worker_serves_it(cluster: PodmanCluster) -> None:
    values = {
        "router": {"replicas": 1},
        "model": "/models/smollm2",
        "weights": {"source": "init"},
        "shards": [{"name": "s0", "layers": "0:2", "replicas": 1}],
    }
    release = _render(values)
    secrets = _secrets(release)
    (sts,) = release.statefulsets
    group = sts["metadata"]["name"]
    pod_name = f"{group}-0"
    ip = cluster.allocate(pod_name, [f"{pod_name}.{group}.ml.svc.{release.values['clusterDomain']}"])
    spec = sts["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["shardmesh"] and init["args"][:2] == ["convert", "smollm2"]

    volumes: dict[str, str] = {}  # the pod's volumes, shared by its init and main containers
    start = time.monotonic()
    done = cluster.run(pod_name, spec, init, secrets, ip, volumes_by_name=volumes, detach=False, timeout=600)
    convert_s = time.monotonic() - start
    assert done.returncode == 0, f"init container failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    weights = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volumes["weights"]).stdout.strip())
    files = {p.name for p in (weights / "smollm2").iterdir()}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files

    (main,) = spec["containers"]
    worker = cluster.run(pod_name, spec, main, secrets, ip, volumes_by_name=volumes)
    try:
        _wait_serving(f"{worker.ip}:{worker.probe_port()}", _startup_budget_s(main))
    except AssertionError:
        raise AssertionError(f"worker on converted weights never SERVING:\n{cluster.logs(worker)}") from None
    code, elapsed = cluster.stop(worker)
    assert code == 0 and elapsed < worker.grace_s, f"exit code {code} after {elapsed:.1f} s"
    print(f"convert smollm2 in the init container: {convert_s:.1f} s")
