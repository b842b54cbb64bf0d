"""Renders the chart over a matrix of values and checks every rendered object.

Each case is validated against the Kubernetes schema (strict) and against invariants that hold for any
values: labels, selectors, Services and PDBs selecting the right pods, probes, ports, security settings (every
TLS, mesh-key and token file a flag names is mounted read-only from a Secret the release has; no plaintext gRPC
listener with TLS), NetworkPolicies covering every pod, and every container command parsing with the installed
`shardmesh` CLI.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.cli.parser import build_parser
from services.discovery.static import parse_addresses
from services.discovery.url import parse_discovery
from services.layers import LayerSpan
from tests.helm.rendering import (
    NAMESPACE,
    POD_ENV_SAMPLE,
    RELEASE,
    STABLE_LABELS,
    STANDARD_LABELS,
    Release,
    container_port,
    parse_cli,
    pod_templates,
    render,
    selects,
    validate_k8s,
)

pytestmark = pytest.mark.helm

FOUR_GROUPS = [
    {"name": "s0", "layers": "0:2", "replicas": 1},
    {"name": "s1", "layers": "2:3", "replicas": 2},
    {"name": "s2", "layers": "3:5", "replicas": 3, "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}},
    {"name": "s3", "layers": "5:6", "replicas": 4},
]
SMOLLM2_DIR = "/models/smollm2"
# consul-k8s registers pod IPs, which no certificate names: the chart refuses those registrations with TLS.
NO_TLS = {"enabled": False}
TOKENS = {"0123456789abcdef0123": "team-a", "fedcba9876543210fedc": "team-b"}

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "one-group": {"shards": [{"name": "all", "layers": "0:6", "replicas": 1}]},
    "four-groups": {"shards": FOUR_GROUPS},
    "consul-existing-agent": {
        "consul": {"address": "consul-server.consul.svc:8500", "aclToken": {"secretName": "consul-acl", "secretKey": "token"}},
    },
    "consul-node-agent-ttl": {
        "consul": {"address": "$(HOST_IP):8500", "check": "ttl", "tags": ["prod", "minilm"]},
    },
    "consul-dependency-agent": {"consul": {"enabled": True, "client": {"enabled": True}}},
    "consul-dependency-connect-inject": {"consul": {"enabled": True, "registration": "connect-inject"}, "tls": NO_TLS},
    "consul-k8s-connect-inject": {
        "consul": {"address": "consul-server.consul.svc:8500", "registration": "connect-inject", "tags": ["prod"],
                   "aclToken": {"secretName": "consul-acl"}},
        "tls": NO_TLS,
    },
    "consul-k8s-catalog-sync": {"consul": {"address": "consul-server.consul.svc:8500", "registration": "catalog-sync"},
                                "tls": NO_TLS},
    "consul-acl-token-value": {"consul": {"address": "consul-server.consul.svc:8500", "aclToken": {"value": "acl-secret-1"}}},
    "weights-pvc": {"model": SMOLLM2_DIR, "weights": {"source": "pvc", "pvc": {"claimName": "smollm2-weights", "subPath": "v1"}}},
    "weights-init-convert": {"model": SMOLLM2_DIR, "weights": {"source": "init"}},
    "weights-init-copy": {
        "model": SMOLLM2_DIR,
        "weights": {"source": "init", "init": {"copyFrom": "/weights/smollm2", "image": {"repository": "registry.example/smollm2-weights", "tag": "1"}}},
    },
    "tls-mutual": {"tls": {"enabled": True, "secretName": "shardmesh-tls"}},
    "tls-server-only": {"tls": {"enabled": True, "secretName": "shardmesh-tls", "mutual": False}},
    "tls-custom-health-ports": {
        "tls": {"enabled": True, "secretName": "shardmesh-tls"},
        "router": {"healthPort": 8081},
        "worker": {"healthPort": 8082},
    },
    "tls-cert-manager": {"tls": {"certManager": {"enabled": True}}},
    "tls-cert-manager-cluster-issuer": {
        "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
                "routerDnsNames": ["shardmesh.example.com"]},
    },
    "dev-insecure": {"tls": NO_TLS, "networkPolicy": {"enabled": False}, "meshKey": {"enabled": False}},
    "client-auth-tokens": {"router": {"auth": {"tokens": TOKENS, "tenants": {"team-b": {"rate_limit_rps": 5}}},
                                      "rateLimitRps": 20, "maxTextBytes": 65536}},
    "client-auth-existing-secret": {"router": {"auth": {"existingSecret": "tokens", "secretKey": "t.yaml"}},
                                    "test": {"tokenSecret": {"name": "tok", "key": "t"}},
                                    "meshKey": {"existingSecret": "mesh", "secretKey": "k"}},
    "network-policy": {
        "networkPolicy": {"enabled": True, "clients": [{"namespaceSelector": {"matchLabels": {"team": "search"}}}]},
    },
    "network-policy-ingress-only": {"networkPolicy": {"egress": {"enabled": False}}},
    "network-policy-consul-agent": {"networkPolicy": {"enabled": True}, "consul": {"address": "$(HOST_IP):8500"}},
    "existing-service-accounts": {"serviceAccount": {"create": False, "routerName": "ops-router", "workerName": "ops-worker"}},
    "everything": {
        "shards": FOUR_GROUPS,
        "model": SMOLLM2_DIR,
        "weights": {"source": "pvc", "pvc": {"claimName": "smollm2-weights"}},
        "tls": {"enabled": True, "secretName": "shardmesh-tls"},
        "networkPolicy": {"enabled": True, "egress": {"extra": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}},
        "consul": {"address": "consul-server.consul.svc:8500", "aclToken": {"value": "acl-1"}},
        "router": {"replicas": 3, "mode": "relay", "requestTimeoutS": 12.5, "hopTimeoutMs": 800, "maxAttempts": 4,
                   "retryBudget": 0.1, "hedgeAfterMs": 50, "ejectAfterFailures": 2, "ejectBaseS": 7.5,
                   "maxInflight": 1000000, "maxTensorMb": 64, "rateLimitRps": 2.5, "maxTextBytes": 4096,
                   "auth": {"tokens": TOKENS},
                   "wireDtype": "bfloat16", "model": SMOLLM2_DIR},
        "worker": {"maxInflight": 32, "maxTensorMb": 128, "threads": 4, "wireDtype": "float16", "cacheBudgetMb": 2048,
                   "sessionTtlS": 120, "graceS": 20, "terminationGracePeriodSeconds": 40},
        "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "4"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"annotations": {"iam.example/role": "shardmesh"}},
    },
}


@pytest.fixture(scope="module", params=sorted(CASES), ids=sorted(CASES))
def release(request: pytest.FixtureRequest, chart: Any) -> Release:
    return render(chart, CASES[request.param])


def consul_on(values: dict[str, Any]) -> bool:
    return bool(values["consul"]["enabled"] or values["consul"]["address"])


def test_every_object_is_valid_kubernetes(release: Release) -> None:
    assert release.objects
    for obj in release.objects:
        validate_k8s(obj)


def test_standard_labels_everywhere(release: Release) -> None:
    for obj in release.objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "shardmesh"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for _, meta, _ in pod_templates(release):
        assert all(k in meta["labels"] for k in STANDARD_LABELS)


def test_selectors_use_stable_labels_and_match_their_pods(release: Release) -> None:
    for obj in release.objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]["matchLabels"]
        elif obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        elif obj["kind"] == "NetworkPolicy":
            selector = obj["spec"]["podSelector"]["matchLabels"]
        else:
            continue
        assert set(selector) <= STABLE_LABELS, f"{obj['kind']}/{obj['metadata']['name']} selects on {set(selector) - STABLE_LABELS}"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert selects(selector, obj["spec"]["template"]["metadata"]["labels"])


def _selected_workloads(selector: dict[str, str], release: Release) -> set[str]:
    return {
        f"{owner['kind']}/{owner['metadata']['name']}"
        for owner, meta, _ in pod_templates(release)
        if selects(selector, meta["labels"])
    }


def test_services_select_exactly_their_pods(release: Release) -> None:
    router = release.router
    router_svc = release.one("Service", router["metadata"]["name"])
    assert _selected_workloads(router_svc["spec"]["selector"], release) == {f"Deployment/{router['metadata']['name']}"}
    assert router_svc["spec"].get("clusterIP") != "None"
    for sts in release.statefulsets:
        svc = release.one("Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service must be headless"
        assert _selected_workloads(svc["spec"]["selector"], release) == {f"StatefulSet/{sts['metadata']['name']}"}
    # Every Service port targets a named port of the containers it selects, with the number from values.
    for svc in release.of_kind("Service"):
        for owner, meta, spec in pod_templates(release):
            if owner["kind"] == "Pod" or not selects(svc["spec"]["selector"], meta["labels"]):
                continue
            main = spec["containers"][0]
            for port in svc["spec"]["ports"]:
                assert port["port"] == container_port(main, port["targetPort"])


def test_one_pdb_per_shard_group_with_max_unavailable_1(release: Release) -> None:
    shards = release.values["shards"]
    pdbs = release.of_kind("PodDisruptionBudget")
    assert len(pdbs) == len(shards) == len(release.statefulsets)
    covered = set()
    for pdb in pdbs:
        assert pdb["spec"]["maxUnavailable"] == 1
        assert "minAvailable" not in pdb["spec"]
        selected = _selected_workloads(pdb["spec"]["selector"]["matchLabels"], release)
        assert len(selected) == 1 and next(iter(selected)).startswith("StatefulSet/"), selected
        covered |= selected
    assert covered == {f"StatefulSet/{s['metadata']['name']}" for s in release.statefulsets}


def test_one_statefulset_per_shard_group(release: Release) -> None:
    by_group = {s["metadata"]["labels"]["shardmesh.io/shard-group"]: s for s in release.statefulsets}
    assert sorted(by_group) == sorted(s["name"] for s in release.values["shards"])
    for shard in release.values["shards"]:
        sts = by_group[shard["name"]]
        assert sts["metadata"]["name"] == f"{RELEASE}-shardmesh-{shard['name']}"
        assert sts["spec"]["replicas"] == shard["replicas"]
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        worker = sts["spec"]["template"]["spec"]["containers"][0]
        expected = shard.get("resources") or release.values["worker"]["resources"]
        assert worker["resources"] == expected


def test_probes_use_grpc_health(release: Release) -> None:
    """Native gRPC probes everywhere: on the gRPC port, or with TLS (which the kubelet's probe cannot speak) on the
    plaintext health-only listener that --health-listen opens on the `health` container port."""
    values = release.values
    tls = values["tls"]["enabled"]
    for owner, _, spec in pod_templates(release):
        if owner["kind"] == "Pod":
            continue
        main = spec["containers"][0]
        cfg = values["router" if owner["kind"] == "Deployment" else "worker"]
        args = parse_cli(main, f"{owner['metadata']['name']}-0")
        port_names = {p["name"] for p in main["ports"]}
        if tls:
            health_port = container_port(main, "health")
            assert health_port == cfg["healthPort"]
            assert health_port not in (container_port(main, "grpc"), container_port(main, "metrics"))
            assert args.health_listen == f"0.0.0.0:{health_port}"
            probe_port = health_port
        else:
            assert "health" not in port_names and args.health_listen is None
            probe_port = container_port(main, "grpc")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = main[kind]
            assert probe["grpc"] == {"port": probe_port, "service": ""}, f"{owner['metadata']['name']} {kind}"
            assert not {"tcpSocket", "httpGet", "exec"} & set(probe), f"{owner['metadata']['name']} {kind}"
            for key, value in cfg[kind].items():
                assert probe[key] == value
        if owner["kind"] == "StatefulSet":
            startup = main["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "start-up probe too short for model loading"


def test_health_port_is_for_the_kubelet_only(release: Release) -> None:
    """No Service exposes the plaintext health port, and no NetworkPolicy rule opens it to pods but the Consul
    agents whose gRPC check calls it: the kubelet's probes come from the pod's node, which NetworkPolicy always
    allows."""
    values = release.values
    for svc in release.of_kind("Service"):
        assert all(p["targetPort"] != "health" and p["name"] != "health" for p in svc["spec"]["ports"])
    agent_checks = consul_on(values) and values["consul"]["registration"] == "agent" and values["consul"]["check"] == "grpc"
    for policy in release.of_kind("NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            if any(p["port"] == "health" for p in rule.get("ports", [])):
                assert agent_checks and values["tls"]["enabled"], policy["metadata"]["name"]
                assert rule == {"from": [values["networkPolicy"]["consulAgents"]], "ports": [{"port": "health", "protocol": "TCP"}]}


def _secret_sources(release: Release) -> dict[str, set[str] | None]:
    """Secrets a pod of this release may mount: name -> keys it holds (None: exists outside the chart, or
    filled by cert-manager with tls.crt, tls.key and ca.crt)."""
    sources: dict[str, set[str] | None] = {}
    for secret in release.of_kind("Secret"):
        sources[secret["metadata"]["name"]] = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
    for cert in release.of_kind("Certificate"):
        sources[cert["spec"]["secretName"]] = {"tls.crt", "tls.key", "ca.crt"}
    values = release.values
    for name in (values["tls"]["secretName"], values["meshKey"]["existingSecret"], values["router"]["auth"]["existingSecret"],
                 values["consul"]["aclToken"]["secretName"], values["test"]["tokenSecret"]["name"]):
        if name:
            assert name not in sources, f"{name} is named in values and also rendered"
            sources[name] = None
    return sources


def test_secret_files_are_mounted_read_only_from_the_release_secrets(release: Release) -> None:
    """Every file a TLS, mesh-key or token flag names lies in a read-only Secret volume of a Secret the release
    renders (holding that key), fills through cert-manager, or names in values; Secret env vars likewise."""
    sources = _secret_sources(release)
    file_flags = ("tls_cert", "tls_key", "tls_ca", "mesh_key_file", "auth_tokens_file")
    for owner, _, spec in pod_templates(release):
        volumes = {v["name"]: v for v in spec["volumes"]}
        container = spec["containers"][0]
        args = vars(parse_cli(container, f"{owner['metadata']['name']}-0"))
        for flag in file_flags:
            path = args.get(flag)
            if not path:
                continue
            mount = next((m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
            assert mount is not None, f"{owner['metadata']['name']}: --{flag} {path} is on no volume"
            assert mount.get("readOnly") is True and "subPath" not in mount, mount
            secret = volumes[mount["name"]]["secret"]
            assert secret["defaultMode"] == 0o440
            key = path[len(mount["mountPath"].rstrip("/")) + 1:]
            if "items" in secret:
                (item,) = secret["items"]
                assert item["path"] == key
                key = item["key"]
            assert secret["secretName"] in sources, f"{owner['metadata']['name']}: Secret {secret['secretName']} is nowhere"
            held = sources[secret["secretName"]]
            assert held is None or key in held, f"Secret {secret['secretName']} has no key {key} (has {held})"
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                held = sources.get(ref["name"], set())
                assert ref["name"] in sources and (held is None or ref["key"] in held), env


def test_tls_means_no_plaintext_grpc_listener(release: Release) -> None:
    """With TLS, every container port is the TLS gRPC port, the health-only port (--health-listen) or metrics;
    router and workers present a certificate and, with mutual TLS, verify their peers'."""
    values = release.values
    if not values["tls"]["enabled"]:
        return
    for owner, _, spec in pod_templates(release):
        if owner["kind"] == "Pod":
            continue
        main = spec["containers"][0]
        args = parse_cli(main, f"{owner['metadata']['name']}-0")
        assert {p["name"] for p in main["ports"]} == {"grpc", "health", "metrics"}
        assert args.tls_cert and args.tls_key and bool(args.tls_ca) == values["tls"]["mutual"]
        assert args.listen == f"0.0.0.0:{container_port(main, 'grpc')}"
        assert args.health_listen == f"0.0.0.0:{container_port(main, 'health')}"
    for svc in release.of_kind("Service"):
        assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}


def test_network_policies_cover_every_mesh_pod(release: Release) -> None:
    np = release.values["networkPolicy"]
    policies = release.of_kind("NetworkPolicy")
    if not np["enabled"]:
        assert policies == []
        return
    expected_types = ["Ingress", "Egress"] if np["egress"]["enabled"] else ["Ingress"]
    for owner, meta, _ in pod_templates(release):
        if owner["kind"] == "Pod":
            continue
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], meta["labels"])]
        assert policy["spec"]["policyTypes"] == expected_types
        assert ("egress" in policy["spec"]) is np["egress"]["enabled"]


def test_pods_are_locked_down(release: Release) -> None:
    cache = release.values["cache"]["path"]
    for owner, _, spec in pod_templates(release):
        name = owner["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        connect_inject = owner["kind"] == "StatefulSet" and release.values["consul"]["registration"] == "connect-inject" and consul_on(release.values)
        assert spec["automountServiceAccountToken"] is connect_inject, name
        assert spec["serviceAccountName"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            assert "emptyDir" in volumes[mounts[cache]], name
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env["SHARDMESH_CACHE"] == cache
            assert env["HF_HOME"].startswith(cache + "/")


def test_containers_run_the_installed_cli(release: Release) -> None:
    """Every `shardmesh` container's argv parses with services.cli.parser.build_parser()."""
    for owner, _, spec in pod_templates(release):
        pod_name = f"{owner['metadata']['name']}-0"
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container.get("command") == ["shardmesh"]:
                parse_cli(container, pod_name)
            else:
                assert container["name"] == "weights" and container["command"][0] == "cp", container


def test_worker_flags_match_the_pod(release: Release) -> None:
    values = release.values
    registration = values["consul"]["registration"] if consul_on(values) else "none"
    shards = {s["name"]: s for s in values["shards"]}
    for sts in release.statefulsets:
        spec = sts["spec"]["template"]["spec"]
        worker = spec["containers"][0]
        pod_name = f"{sts['metadata']['name']}-0"
        args = parse_cli(worker, pod_name)
        shard = shards[sts["metadata"]["labels"]["shardmesh.io/shard-group"]]
        grpc_port = container_port(worker, "grpc")
        assert args.command == "worker"
        assert args.model == values["model"]
        assert LayerSpan.parse(args.layers) == LayerSpan.parse(shard["layers"])
        assert args.listen == f"0.0.0.0:{grpc_port}" and grpc_port == values["worker"]["port"]
        if values["tls"]["enabled"]:
            # Peers verify the worker's certificate, which names its per-pod DNS name (not its pod IP).
            assert args.advertise == f"{pod_name}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local:{grpc_port}"
        else:
            assert args.advertise == f"{POD_ENV_SAMPLE['POD_IP']}:{grpc_port}"
        assert bool(getattr(args, "mesh_key_file", None)) is values["meshKey"]["enabled"]
        assert args.worker_id == pod_name
        assert args.metrics_listen == f"0.0.0.0:{container_port(worker, 'metrics')}"
        if registration == "agent":
            assert args.consul == f"{POD_ENV_SAMPLE['HOST_IP']}:{values['consul']['agentPort']}"
            assert not args.no_consul_register
            assert args.consul_service == values["consul"]["serviceName"]
            assert args.consul_check == values["consul"]["check"]
            assert args.consul_tag == values["consul"]["tags"]
        else:
            assert args.consul is None and args.no_consul_register
        if values["tls"]["enabled"]:
            assert args.tls_cert and args.tls_key
            assert bool(args.tls_ca) == values["tls"]["mutual"]
        else:
            assert args.tls_cert is None and args.tls_key is None and args.tls_ca is None


def test_router_flags_match_the_release(release: Release) -> None:
    values = release.values
    router = release.router["spec"]["template"]["spec"]["containers"][0]
    args = parse_cli(router, f"{RELEASE}-shardmesh-router-abc")
    assert args.command == "router"
    assert args.listen == f"0.0.0.0:{values['router']['port']}" == f"0.0.0.0:{container_port(router, 'grpc')}"
    assert args.metrics_listen == f"0.0.0.0:{container_port(router, 'metrics')}"
    assert args.mode == values["router"]["mode"]
    if consul_on(values):
        assert args.workers is None
        spec = parse_discovery(args.discovery, env={})
        assert spec.kind == "consul" and spec.service == values["consul"]["serviceName"]
    else:
        assert args.discovery is None
        expected = [
            f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local:{values['worker']['port']}"
            for sts in release.statefulsets
            for i in range(sts["spec"]["replicas"])
        ]
        assert list(parse_addresses(args.workers)) == expected
    assert release.router["spec"]["replicas"] == values["router"]["replicas"]
    auth = values["router"]["auth"]
    assert bool(args.auth_tokens_file) == bool(auth["existingSecret"] or auth["tokens"])
    assert bool(getattr(args, "mesh_key_file", None)) is values["meshKey"]["enabled"]
    # Optional flags: rendered only when set, else the CLI default applies.
    defaults = build_parser().parse_args(["router", "--workers", "x:1"])
    for key, attr in (("ejectAfterFailures", "eject_after_failures"), ("ejectBaseS", "eject_base_s"),
                      ("rateLimitRps", "rate_limit_rps"), ("maxTextBytes", "max_text_bytes")):
        expected = values["router"].get(key)  # null defaults drop out of the merged values
        assert getattr(args, attr) == (getattr(defaults, attr) if expected is None else expected)
        assert ("--" + attr.replace("_", "-") in router["args"]) is (expected is not None)


def test_helm_test_pod_calls_the_router(release: Release) -> None:
    pod = release.test_pod
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    args = parse_cli(pod["spec"]["containers"][0])
    router_svc = release.one("Service", f"{RELEASE}-shardmesh-router")
    grpc = next(p for p in router_svc["spec"]["ports"] if p["name"] == "grpc")
    assert args.command == "infer"
    assert args.router == f"{router_svc['metadata']['name']}:{grpc['port']}"
    assert args.text == [release.values["test"]["text"]]
    tls = release.values["tls"]
    assert bool(args.tls_ca) == tls["enabled"]
    # With mutual TLS the router demands a client certificate: the pod presents the release's own.
    mutual = tls["enabled"] and tls["mutual"]
    assert bool(args.tls_cert) == bool(args.tls_key) == mutual
    if mutual:
        assert (args.tls_cert, args.tls_key) == (f"{tls['mountPath']}/tls.crt", f"{tls['mountPath']}/tls.key")


def test_notes_tell_how_to_call_the_router(release: Release) -> None:
    port = release.values["router"]["port"]
    assert f"port-forward service/{RELEASE}-shardmesh-router {port}:{port}" in release.notes
    assert f"shardmesh infer --router 127.0.0.1:{port}" in release.notes
    assert f"helm test {RELEASE}" in release.notes
    tls = release.values["tls"]
    assert ("--tls-ca ca.crt" in release.notes) is tls["enabled"]
    assert ("--tls-cert client.crt --tls-key client.key" in release.notes) is (tls["enabled"] and tls["mutual"])
