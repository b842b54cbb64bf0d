"""One test per chart feature: Consul registration styles, weights sources, TLS, NetworkPolicy."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.rendering import NAMESPACE, RELEASE, Release, parse_cli, pod_templates, render

pytestmark = pytest.mark.helm

EXISTING_CONSUL = "consul-server.consul.svc:8500"


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _worker_pods(release: Release) -> list[dict[str, Any]]:
    return [sts["spec"]["template"] for sts in release.statefulsets]


def _router_pod(release: Release) -> dict[str, Any]:
    return release.router["spec"]["template"]


def _main_pods(release: Release) -> list[dict[str, Any]]:
    return [_router_pod(release), *_worker_pods(release)]


# ---------- Consul ----------


def test_without_consul_workers_do_not_register_and_router_gets_static_list(chart: Any) -> None:
    release = render(chart)
    for pod in _worker_pods(release):
        assert "--no-consul-register" in pod["spec"]["containers"][0]["args"]
    assert "--workers" in _router_pod(release)["spec"]["containers"][0]["args"]
    for pod in _main_pods(release):
        assert "CONSUL_HTTP_TOKEN" not in _env(pod["spec"]["containers"][0])


def test_agent_registration_uses_the_node_agent_through_the_downward_api(chart: Any) -> None:
    release = render(chart, {"consul": {"address": EXISTING_CONSUL}})
    for pod in _worker_pods(release):
        worker = pod["spec"]["containers"][0]
        assert _env(worker)["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
        args = worker["args"]
        assert args[args.index("--consul") + 1] == "$(HOST_IP):8500"
        assert "--no-consul-register" not in args
        assert not any(k.startswith("consul.hashicorp.com/") for k in pod["metadata"]["annotations"])
    router_args = _router_pod(release)["spec"]["containers"][0]["args"]
    assert router_args[router_args.index("--discovery") + 1] == f"consul://{EXISTING_CONSUL}?service=shardmesh-worker"


def test_router_can_use_the_agent_on_its_node(chart: Any) -> None:
    release = render(chart, {"consul": {"address": "$(HOST_IP):8500"}})
    router = _router_pod(release)["spec"]["containers"][0]
    assert router["args"][router["args"].index("--discovery") + 1] == "consul://$(HOST_IP):8500?service=shardmesh-worker"
    assert parse_cli(router).discovery == "consul://192.168.0.7:8500?service=shardmesh-worker"


def test_acl_token_comes_from_a_secret(chart: Any) -> None:
    release = render(chart, {"consul": {"address": EXISTING_CONSUL, "aclToken": {"secretName": "consul-acl", "secretKey": "tok"}}})
    for pod in _main_pods(release):
        token = _env(pod["spec"]["containers"][0])["CONSUL_HTTP_TOKEN"]
        assert token == {"name": "CONSUL_HTTP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "consul-acl", "key": "tok"}}}


def test_consul_dependency_points_the_router_at_its_server_service(chart: Any) -> None:
    release = render(chart, {"consul": {"enabled": True, "client": {"enabled": True}}})
    args = _router_pod(release)["spec"]["containers"][0]["args"]
    assert args[args.index("--discovery") + 1] == f"consul://{RELEASE}-consul-server.{NAMESPACE}.svc:8500?service=shardmesh-worker"
    named = render(chart, {"consul": {"enabled": True, "client": {"enabled": True}, "global": {"name": "consul"}}})
    args = _router_pod(named)["spec"]["containers"][0]["args"]
    assert args[args.index("--discovery") + 1] == f"consul://consul-server.{NAMESPACE}.svc:8500?service=shardmesh-worker"


def test_connect_inject_registration_by_consul_k8s(chart: Any) -> None:
    release = render(chart, {"consul": {"address": EXISTING_CONSUL, "registration": "connect-inject", "serviceName": "mesh-a", "tags": ["x", "y"]},
                             "tls": {"enabled": False}})
    for sts in release.statefulsets:
        pod = sts["spec"]["template"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["consul.hashicorp.com/connect-inject"] == "true"
        assert annotations["consul.hashicorp.com/connect-service"] == "mesh-a"
        assert annotations["consul.hashicorp.com/connect-service-port"] == "grpc"
        assert annotations["consul.hashicorp.com/transparent-proxy"] == "false"
        assert annotations["consul.hashicorp.com/service-meta-layers"] == sts["metadata"]["annotations"]["shardmesh.io/layers"]
        assert annotations["consul.hashicorp.com/service-tags"] == "x,y"
        args = pod["spec"]["containers"][0]["args"]
        assert "--no-consul-register" in args and "--consul" not in args
        # consul-k8s with ACLs: the ServiceAccount is named like the Consul service and its token is mounted.
        assert pod["spec"]["serviceAccountName"] == "mesh-a"
        assert pod["spec"]["automountServiceAccountToken"] is True
    assert {sa["metadata"]["name"] for sa in release.of_kind("ServiceAccount")} == {f"{RELEASE}-shardmesh-router", "mesh-a"}
    # Only workers join: the router and the test pod opt out even where injection is the namespace default.
    assert _router_pod(release)["metadata"]["annotations"]["consul.hashicorp.com/connect-inject"] == "false"
    assert release.test_pod["metadata"]["annotations"]["consul.hashicorp.com/connect-inject"] == "false"
    for svc in release.of_kind("Service"):
        if svc["spec"].get("clusterIP") == "None":
            assert svc["metadata"]["annotations"]["consul.hashicorp.com/service-sync"] == "false"


def test_catalog_sync_registration_by_consul_k8s(chart: Any) -> None:
    release = render(chart, {"consul": {"address": EXISTING_CONSUL, "registration": "catalog-sync"}, "tls": {"enabled": False}})
    headless = [s for s in release.of_kind("Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 2
    for svc in headless:
        annotations = svc["metadata"]["annotations"]
        assert annotations["consul.hashicorp.com/service-sync"] == "true"
        assert annotations["consul.hashicorp.com/service-name"] == "shardmesh-worker"
        assert annotations["consul.hashicorp.com/service-port"] == "grpc"
        assert annotations["consul.hashicorp.com/service-meta-layers"] == svc["metadata"]["annotations"]["shardmesh.io/layers"]
    for pod in _worker_pods(release):
        assert "--no-consul-register" in pod["spec"]["containers"][0]["args"]
        assert "consul.hashicorp.com/connect-inject" not in pod["metadata"]["annotations"]
        assert pod["spec"]["automountServiceAccountToken"] is False


# ---------- weights ----------


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod["spec"]["volumes"] if v["name"] == name), None)


def test_weights_baked_into_the_image_need_no_volume(chart: Any) -> None:
    release = render(chart)
    for pod in _main_pods(release):
        assert _volume(pod, "weights") is None
        assert "initContainers" not in pod["spec"]


def test_weights_from_an_existing_pvc(chart: Any) -> None:
    release = render(chart, {"model": "/models/m", "weights": {"source": "pvc", "pvc": {"claimName": "w", "subPath": "v2"}}})
    for pod in _main_pods(release):
        assert _volume(pod, "weights") == {"name": "weights", "persistentVolumeClaim": {"claimName": "w", "readOnly": True}}
        mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "weights")
        assert mount == {"name": "weights", "mountPath": "/models", "readOnly": True, "subPath": "v2"}
    router_args = parse_cli(_router_pod(release)["spec"]["containers"][0])
    assert router_args.model == "/models/m", "the router reads the tokenizer from the same directory"


def test_weights_converted_by_an_init_container(chart: Any) -> None:
    release = render(chart, {"model": "/models/smollm2", "weights": {"source": "init", "init": {"sizeLimit": "3Gi"}}})
    for pod in _main_pods(release):
        assert _volume(pod, "weights") == {"name": "weights", "emptyDir": {"sizeLimit": "3Gi"}}
        (init,) = pod["spec"]["initContainers"]
        args = parse_cli(init)
        assert (args.command, args.model, args.out_dir) == ("convert", "smollm2", "/models/smollm2")
        assert {"name": "weights", "mountPath": "/models"} in init["volumeMounts"]


def test_weights_copied_by_an_init_container(chart: Any) -> None:
    release = render(chart, {"model": "/models/m", "weights": {"source": "init", "init": {"copyFrom": "/data/m/", "image": {"repository": "reg/w", "tag": "7"}}}})
    for pod in _main_pods(release):
        (init,) = pod["spec"]["initContainers"]
        assert init["image"] == "reg/w:7"
        assert init["command"] == ["cp", "-R", "/data/m/.", "/models/m"]


# ---------- TLS ----------


def test_tls_mounts_the_secret_and_passes_the_files(chart: Any) -> None:
    release = render(chart, {"tls": {"enabled": True, "secretName": "sm-tls"}})
    for owner, _, spec in pod_templates(release):
        assert _volume({"spec": spec}, "tls") == {"name": "tls", "secret": {"secretName": "sm-tls", "defaultMode": 0o440}}
        container = spec["containers"][0]
        assert {"name": "tls", "mountPath": "/etc/shardmesh/tls", "readOnly": True} in container["volumeMounts"]
        args = parse_cli(container, f"{owner['metadata']['name']}-0")
        assert args.tls_ca == "/etc/shardmesh/tls/ca.crt"
        # Servers present the certificate; the helm test pod presents it as its client certificate (mutual TLS).
        assert (args.tls_cert, args.tls_key) == ("/etc/shardmesh/tls/tls.crt", "/etc/shardmesh/tls/tls.key")
    assert "--tls-cert client.crt --tls-key client.key" in release.notes
    assert "works only with" not in release.notes


def test_tls_without_a_ca_is_server_tls_only(chart: Any) -> None:
    release = render(chart, {"tls": {"enabled": True, "secretName": "sm-tls", "mutual": False}})
    for pod in _main_pods(release):
        args = parse_cli(pod["spec"]["containers"][0])
        assert args.tls_cert and args.tls_key and args.tls_ca is None
    infer = parse_cli(release.test_pod["spec"]["containers"][0])
    assert infer.tls_ca == "/etc/shardmesh/tls/ca.crt" and infer.tls_cert is None and infer.tls_key is None
    assert "--tls-cert" not in release.notes


def _probe_ports(container: dict[str, Any]) -> set[int]:
    return {container[kind]["grpc"]["port"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_without_tls_probes_call_the_grpc_port_and_no_health_listener_opens(chart: Any) -> None:
    release = render(chart, {"tls": {"enabled": False}})
    for pod, port in ((_router_pod(release), 50050), *((p, 50051) for p in _worker_pods(release))):
        container = pod["spec"]["containers"][0]
        assert parse_cli(container).health_listen is None
        assert "health" not in {p["name"] for p in container["ports"]}
        assert _probe_ports(container) == {port}


def test_with_tls_probes_call_the_plaintext_health_listener(chart: Any) -> None:
    release = render(chart, {"tls": {"enabled": True, "secretName": "sm-tls"}})
    for pod, port in ((_router_pod(release), 50053), *((p, 50052) for p in _worker_pods(release))):
        container = pod["spec"]["containers"][0]
        assert parse_cli(container).health_listen == f"0.0.0.0:{port}"
        assert {"name": "health", "containerPort": port, "protocol": "TCP"} in container["ports"]
        assert _probe_ports(container) == {port}
        assert all(container[k]["grpc"]["service"] == "" for k in ("startupProbe", "readinessProbe", "livenessProbe"))
    custom = render(chart, {"tls": {"enabled": True, "secretName": "sm-tls"}, "router": {"healthPort": 7000},
                            "worker": {"healthPort": 7001}})
    router = _router_pod(custom)["spec"]["containers"][0]
    assert parse_cli(router).health_listen == "0.0.0.0:7000" and _probe_ports(router) == {7000}
    for pod in _worker_pods(custom):
        worker = pod["spec"]["containers"][0]
        assert parse_cli(worker).health_listen == "0.0.0.0:7001" and _probe_ports(worker) == {7001}


# ---------- NetworkPolicy ----------


def _selector(component: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": "shardmesh", "app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": component}}


def test_network_policy_can_be_turned_off(chart: Any) -> None:
    assert render(chart, {"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


def test_network_policy_allows_only_mesh_traffic(chart: Any) -> None:
    clients = [{"namespaceSelector": {"matchLabels": {"team": "search"}}}]
    release = render(chart, {"networkPolicy": {"enabled": True, "clients": clients}})
    workers = release.one("NetworkPolicy", f"{RELEASE}-shardmesh-worker")
    assert workers["spec"]["podSelector"] == _selector("worker")
    assert workers["spec"]["policyTypes"] == ["Ingress", "Egress"]
    grpc_rule, metrics_rule = workers["spec"]["ingress"]
    assert grpc_rule["from"] == [{"podSelector": _selector("router")}, {"podSelector": _selector("worker")}]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]

    router = release.one("NetworkPolicy", f"{RELEASE}-shardmesh-router")
    assert router["spec"]["podSelector"] == _selector("router")
    client_rule, router_metrics = router["spec"]["ingress"]
    assert client_rule["from"] == [*clients, {"podSelector": _selector("test")}]
    assert client_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert router_metrics == metrics_rule
    # The helm test pod carries the label the router policy lets in.
    assert release.test_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"


def test_network_policy_admits_consul_agent_health_checks_only_when_they_happen(chart: Any) -> None:
    """The agent's gRPC check calls the plaintext health listener with TLS (the default), the gRPC port without;
    that rule admits the agents only, and only to that port."""
    agents = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "consul", "component": "client"}}}
    for tls, port in ((True, "health"), (False, "grpc")):
        grpc_checks = render(chart, {"tls": {"enabled": tls}, "consul": {"address": "$(HOST_IP):8500"}})
        mesh_rule, agent_rule, _ = grpc_checks.one("NetworkPolicy", f"{RELEASE}-shardmesh-worker")["spec"]["ingress"]
        assert agents not in mesh_rule["from"]
        assert agent_rule == {"from": [agents], "ports": [{"port": port, "protocol": "TCP"}]}
        worker = grpc_checks.statefulsets[0]["spec"]["template"]["spec"]["containers"][0]
        assert port in {p["name"] for p in worker["ports"]}
    ttl = render(chart, {"consul": {"address": "$(HOST_IP):8500", "check": "ttl"}})
    assert len(ttl.one("NetworkPolicy", f"{RELEASE}-shardmesh-worker")["spec"]["ingress"]) == 2


# ---------- misc ----------


def test_version_label_and_image_follow_app_version(chart: Any) -> None:
    release = render(chart)
    app_version = chart.metadata["appVersion"]
    assert release.router["metadata"]["labels"]["app.kubernetes.io/version"] == app_version
    assert _router_pod(release)["spec"]["containers"][0]["image"] == f"shardmesh:{app_version}"
    pinned = render(chart, {"image": {"repository": "reg.example/shardmesh", "tag": "abc"}})
    assert {c["image"] for _, _, s in pod_templates(pinned) for c in s["containers"]} == {"reg.example/shardmesh:abc"}


def test_router_ejection_flags_only_when_set(chart: Any) -> None:
    args = _router_pod(render(chart))["spec"]["containers"][0]["args"]
    assert "--eject-after-failures" not in args and "--eject-base-s" not in args
    router = _router_pod(render(chart, {"router": {"ejectAfterFailures": 2, "ejectBaseS": 12.5}}))["spec"]["containers"][0]
    parsed = parse_cli(router)
    assert (parsed.eject_after_failures, parsed.eject_base_s) == (2, 12.5)


def test_whole_numbers_render_as_integers(chart: Any) -> None:
    release = render(chart, {"router": {"maxInflight": 1000000, "requestTimeoutS": 2.5}})
    args = parse_cli(_router_pod(release)["spec"]["containers"][0])
    assert (args.max_inflight, args.request_timeout_s) == (1000000, 2.5)


def test_existing_service_accounts(chart: Any) -> None:
    release = render(chart, {"serviceAccount": {"create": False, "routerName": "ops-router", "workerName": "ops-worker"}})
    assert release.of_kind("ServiceAccount") == []
    assert _router_pod(release)["spec"]["serviceAccountName"] == "ops-router"
    assert release.test_pod["spec"]["serviceAccountName"] == "ops-router"
    assert {pod["spec"]["serviceAccountName"] for pod in _worker_pods(release)} == {"ops-worker"}
