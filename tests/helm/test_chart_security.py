"""The chart's safe defaults: TLS with a generated CA (or cert-manager, or an existing Secret), NetworkPolicy with
egress limits, the mesh key, client bearer tokens, the Consul ACL token, and what NOTES.txt says about them.

The generated certificates are checked by what matters: real gRPC mutual-TLS handshakes through
services.net.TlsFiles, with the names the router and peers dial. `helm upgrade` keeping them is checked through
Helm's real `lookup` against a loopback stand-in for the Kubernetes API (tests/helm/fake_kube.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import helm_python as helm
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.lifecycle import ServerLifecycle
from services.net import CHANNEL_OPTIONS, TlsFiles, open_channel
from services.security.mesh_key import MIN_KEY_BYTES, load_mesh_key
from services.security.tokens import parse_token_file
from tests.helm.fake_kube import fake_kube
from tests.helm.rendering import (
    NAMESPACE,
    RELEASE,
    Release,
    parse_cli,
    pod_templates,
    render,
    render_upgrade,
    secret_data,
)

pytestmark = pytest.mark.helm

FULL = f"{RELEASE}-shardmesh"
TLS_DIR = "/etc/shardmesh/tls"
ROLES = ("router", "worker", "client")
GENERATED = (f"{FULL}-ca", *(f"{FULL}-{role}-tls" for role in ROLES))
WORKER_HOST = f"{FULL}-s0-0.{FULL}-s0.{NAMESPACE}.svc.cluster.local"  # what the router dials for worker s0-0
TOKENS = {"0123456789abcdef0123": "team-a", "fedcba9876543210fedc": "team-b"}
ROUTER_METHODS = {"Infer", "InferStream", "Generate"}


def _main(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return pod_spec["containers"][0]


def _volume(spec: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in spec["volumes"] if v["name"] == name), None)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _role_of(owner: dict[str, Any]) -> str:
    return {"Deployment": "router", "StatefulSet": "worker", "Pod": "client"}[owner["kind"]]


def _write_tls(release: Release, secret: str, directory: Path) -> TlsFiles:
    """The Secret's files as the pod sees them, loaded as the CLI loads --tls-cert/--tls-key/--tls-ca."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, text in secret_data(release, secret).items():
        (directory / key).write_text(text)
    return TlsFiles.from_flags(str(directory / "tls.crt"), str(directory / "tls.key"), str(directory / "ca.crt"))


async def _serve(tls: TlsFiles) -> ServerLifecycle:
    server = ServerLifecycle("tls-check", (), tls=tls)
    await server.start("127.0.0.1:0")
    await server.set_serving(True)
    return server


async def _health(address: str, tls: TlsFiles, dial_name: str | None = None) -> str:
    """grpc.health.v1 Check over TLS; dial_name is the host name verified (what the caller would dial)."""
    if dial_name is None:
        channel = open_channel(address, tls)  # the production channel: verifies the address as dialled
    else:
        options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", dial_name))
        channel = grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---------- defaults ----------


def test_defaults_turn_on_tls_network_policy_and_mesh_key(chart: Any) -> None:
    release = render(chart)
    # TLS from certificates the chart generated: one CA, one certificate per role, each mounted by its role only.
    for name in GENERATED:
        secret = release.one("Secret", name)
        assert secret["type"] == "kubernetes.io/tls"
        assert {"tls.crt", "tls.key", "ca.crt"} <= set(secret_data(release, name))
    assert release.of_kind("Certificate") == [] and release.of_kind("Issuer") == []
    cas = {secret_data(release, name)["ca.crt"] for name in GENERATED}
    assert len(cas) == 1, "every certificate must chain to the one CA"
    mesh_key = secret_data(release, f"{FULL}-mesh-key")["mesh.key"]
    for owner, _, spec in pod_templates(release):
        role = _role_of(owner)
        assert _volume(spec, "tls")["secret"] == {"secretName": f"{FULL}-{role}-tls", "defaultMode": 0o440}
        args = parse_cli(_main(spec), f"{owner['metadata']['name']}-0")
        assert (args.tls_cert, args.tls_key, args.tls_ca) == (f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key", f"{TLS_DIR}/ca.crt")
        if role == "client":
            assert _volume(spec, "mesh-key") is None, "the test pod is no mesh member"
            continue
        assert args.health_listen and args.mesh_key_file == "/etc/shardmesh/mesh/mesh.key"
        assert _volume(spec, "mesh-key")["secret"]["secretName"] == f"{FULL}-mesh-key"
        assert _volume(spec, "auth-tokens") is None, "client auth is off until tokens are configured"
    assert {p["metadata"]["name"] for p in release.of_kind("NetworkPolicy")} == {f"{FULL}-router", f"{FULL}-worker"}
    # The generated mesh key is what the workers' loader accepts, and random per rendering.
    assert len(mesh_key) == 64 and mesh_key != secret_data(render(chart), f"{FULL}-mesh-key")["mesh.key"]


def test_generated_mesh_key_loads_with_the_workers_loader(chart: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_text(secret_data(render(chart), f"{FULL}-mesh-key")["mesh.key"])
    key_file.chmod(0o600)
    key = load_mesh_key(str(key_file), env={})
    assert key is not None and len(key) >= MIN_KEY_BYTES


def test_with_tls_workers_advertise_the_name_their_certificate_holds(chart: Any) -> None:
    release = render(chart, {"consul": {"address": "consul-server.consul.svc:8500"}})
    for sts in release.statefulsets:
        args = parse_cli(_main(sts["spec"]["template"]["spec"]), f"{sts['metadata']['name']}-1")
        assert args.advertise == f"{sts['metadata']['name']}-1.{sts['metadata']['name']}.{NAMESPACE}.svc.cluster.local:50051"


async def test_generated_certificates_give_mutual_tls_between_router_workers_and_clients(chart: Any, tmp_path: Path) -> None:
    """Real handshakes with the rendered certificates, verifying the names the mesh dials."""
    release = render(chart)
    router, worker, client = (_write_tls(release, f"{FULL}-{role}-tls", tmp_path / role) for role in ROLES)
    stranger = _write_tls(render(chart), f"{FULL}-router-tls", tmp_path / "other-release")
    no_cert = TlsFiles(ca=router.ca)
    worker_server, router_server = await _serve(worker), await _serve(router)
    try:
        # router -> worker and worker -> worker (relay), by the per-pod DNS names the router is given.
        assert await _health(worker_server.address, router, WORKER_HOST) == "SERVING"
        assert await _health(worker_server.address, worker, f"{FULL}-s1-1.{FULL}-s1.{NAMESPACE}.svc.cluster.local") == "SERVING"
        # clients -> router: by its Service name, and at 127.0.0.1 as after `kubectl port-forward` (NOTES.txt).
        assert await _health(router_server.address, client, f"{FULL}-router.{NAMESPACE}.svc") == "SERVING"
        assert await _health(router_server.address, client) == "SERVING"
        # Refused: no client certificate, a certificate of another release's CA, a name the certificate lacks.
        assert await _health(worker_server.address, no_cert, WORKER_HOST) == "UNAVAILABLE"
        assert await _health(worker_server.address, stranger, WORKER_HOST) == "UNAVAILABLE"
        assert await _health(router_server.address, client, f"{FULL}-s0-0.evil.{NAMESPACE}.svc.cluster.local") == "UNAVAILABLE"
        assert await _health(worker_server.address, router, f"{FULL}-router.{NAMESPACE}.svc") == "UNAVAILABLE"
    finally:
        await worker_server.stop(0)
        await router_server.stop(0)


# ---------- upgrades keep what the chart generated ----------


def _generated_data(release: Release) -> dict[str, dict[str, str]]:
    return {name: release.one("Secret", name)["data"] for name in (*GENERATED, f"{FULL}-mesh-key")}


async def test_upgrade_keeps_generated_secrets_and_re_signs_only_what_changed(chart: Any, tmp_path: Path) -> None:
    installed = render(chart)
    before = _generated_data(installed)
    # `helm template` (no cluster to look up) prints fresh ones every time: the documented caveat.
    assert _generated_data(render(chart)) != before
    with fake_kube() as kube, helm.Config(namespace=NAMESPACE, kubeconfig_content=kube.kubeconfig(NAMESPACE)) as cluster:
        kube.store(installed.objects, NAMESPACE)
        assert render_upgrade(chart, cluster).objects and _generated_data(render_upgrade(chart, cluster)) == before
        assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{FULL}-worker-tls" in {p.split("?")[0] for p in kube.requests}

        # A new shard group: only the worker certificate changes (it must name the new pods), signed by the same CA.
        three = {"shards": [{"name": "s0", "layers": "0:2", "replicas": 1}, {"name": "s1", "layers": "2:4", "replicas": 1},
                            {"name": "s2", "layers": "4:6", "replicas": 1}]}
        grown = render_upgrade(chart, cluster, three)
        after = _generated_data(grown)
        assert {n for n in after if after[n] != before[n]} == {f"{FULL}-worker-tls"}
        old_router = _write_tls(installed, f"{FULL}-router-tls", tmp_path / "old-router")
        server = await _serve(_write_tls(grown, f"{FULL}-worker-tls", tmp_path / "new-worker"))
        try:
            s2 = f"{FULL}-s2-0.{FULL}-s2.{NAMESPACE}.svc.cluster.local"
            assert await _health(server.address, old_router, s2) == "SERVING"
        finally:
            await server.stop(0)

        # A certificate within renewBeforeDays of its end is renewed on upgrade; the others stay.
        router_secret = kube.secrets[(NAMESPACE, f"{FULL}-router-tls")]
        router_secret["metadata"]["annotations"]["shardmesh.io/not-after"] = str(int(time.time()) + 5 * 86400)
        renewed = _generated_data(render_upgrade(chart, cluster))
        assert {n for n in renewed if renewed[n] != before[n]} == {f"{FULL}-router-tls"}

        # Without the CA (deleted), a new CA signs new certificates for everyone; the mesh key stays.
        del kube.secrets[(NAMESPACE, f"{FULL}-ca")]
        fresh = _generated_data(render_upgrade(chart, cluster))
        assert {n for n in fresh if fresh[n] != before[n]} == set(GENERATED)


# ---------- other certificate sources ----------


def test_cert_manager_bootstraps_its_own_ca_issuer(chart: Any) -> None:
    release = render(chart, {"tls": {"certManager": {"enabled": True}}})
    generated = render(chart)
    issuers = {i["metadata"]["name"]: i["spec"] for i in release.of_kind("Issuer")}
    assert issuers == {f"{FULL}-selfsigned": {"selfSigned": {}}, f"{FULL}-ca": {"ca": {"secretName": f"{FULL}-ca"}}}
    certs = {c["metadata"]["name"]: c["spec"] for c in release.of_kind("Certificate")}
    ca = certs.pop(f"{FULL}-ca")
    assert ca["isCA"] is True and ca["secretName"] == f"{FULL}-ca" and ca["issuerRef"]["name"] == f"{FULL}-selfsigned"
    assert set(certs) == {f"{FULL}-{role}-tls" for role in ROLES}
    for name, spec in certs.items():
        assert spec["secretName"] == name
        assert spec["issuerRef"] == {"name": f"{FULL}-ca", "kind": "Issuer", "group": "cert-manager.io"}
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["privateKey"]["rotationPolicy"] == "Always"
    worker = certs[f"{FULL}-worker-tls"]
    assert f"*.{FULL}-s0.{NAMESPACE}.svc.cluster.local" in worker["dnsNames"]
    assert f"*.{FULL}-s1.{NAMESPACE}.svc.cluster.local" in worker["dnsNames"]
    router = certs[f"{FULL}-router-tls"]
    assert {f"{FULL}-router", f"{FULL}-router.{NAMESPACE}.svc"} <= set(router["dnsNames"]) and router["ipAddresses"] == ["127.0.0.1"]
    # cert-manager fills the Secrets: the chart renders none of the TLS ones, and the pods mount the same names.
    assert not {s["metadata"]["name"] for s in release.of_kind("Secret")} & set(GENERATED)
    mounted = {_volume(spec, "tls")["secret"]["secretName"] for _, _, spec in pod_templates(release)}
    assert mounted == {_volume(spec, "tls")["secret"]["secretName"] for _, _, spec in pod_templates(generated)}


def test_cert_manager_with_an_existing_issuer(chart: Any) -> None:
    issuer = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    release = render(chart, {"tls": {"certManager": {"enabled": True, "issuerRef": issuer, "duration": "720h", "renewBefore": "240h"},
                                     "routerDnsNames": ["mesh.example.com"], "routerIpAddresses": ["203.0.113.7"]}})
    assert release.of_kind("Issuer") == []
    certs = {c["metadata"]["name"]: c["spec"] for c in release.of_kind("Certificate")}
    assert set(certs) == {f"{FULL}-{role}-tls" for role in ROLES}
    assert all(c["issuerRef"] == issuer and (c["duration"], c["renewBefore"]) == ("720h", "240h") for c in certs.values())
    router = certs[f"{FULL}-router-tls"]
    assert "mesh.example.com" in router["dnsNames"] and router["ipAddresses"] == ["127.0.0.1", "203.0.113.7"]
    assert "cert-manager, issuer corp-ca" in release.notes


def test_an_existing_tls_secret_serves_everyone(chart: Any) -> None:
    release = render(chart, {"tls": {"secretName": "corp-tls"}})
    assert release.of_kind("Certificate") == []
    assert not {s["metadata"]["name"] for s in release.of_kind("Secret")} & set(GENERATED)
    assert {_volume(spec, "tls")["secret"]["secretName"] for _, _, spec in pod_templates(release)} == {"corp-tls"}
    assert "certificates from secret corp-tls" in release.notes


# ---------- mesh key, client tokens, limits ----------


def test_mesh_key_from_an_existing_secret_or_off(chart: Any) -> None:
    release = render(chart, {"meshKey": {"existingSecret": "mesh", "secretKey": "key.hex"}})
    assert not any(s["metadata"]["name"].endswith("-mesh-key") for s in release.of_kind("Secret"))
    for owner, _, spec in pod_templates(release):
        if owner["kind"] == "Pod":
            continue
        assert _volume(spec, "mesh-key")["secret"]["items"] == [{"key": "key.hex", "path": "key.hex"}]
        assert _volume(spec, "mesh-key")["secret"]["secretName"] == "mesh"
        assert parse_cli(_main(spec)).mesh_key_file == "/etc/shardmesh/mesh/key.hex"
    off = render(chart, {"meshKey": {"enabled": False}})
    assert not any(s["metadata"]["name"].endswith("-mesh-key") for s in off.of_kind("Secret"))
    for _, _, spec in pod_templates(off):
        assert _volume(spec, "mesh-key") is None and "--mesh-key-file" not in _main(spec)["args"]
    assert "Mesh key: OFF" in off.notes


def test_client_tokens_from_values_are_a_file_the_router_accepts(chart: Any) -> None:
    tenants = {"team-b": {"rate_limit_rps": 5, "methods": ["Infer"]}}
    release = render(chart, {"router": {"auth": {"tokens": TOKENS, "tenants": tenants}}})
    files = secret_data(release, f"{FULL}-router-tokens")
    table = parse_token_file(yaml.safe_load(files["tokens.yaml"]), source="rendered Secret", known_methods=ROUTER_METHODS)
    assert {token: table.tenant_of(token) for token in TOKENS} == TOKENS
    assert table.policy("team-b").rate_limit_rps == 5 and not table.policy("team-b").allows("Generate")
    router = release.router["spec"]["template"]["spec"]
    assert parse_cli(_main(router)).auth_tokens_file == "/etc/shardmesh/auth/tokens.yaml"
    # Only the tokens file is mounted; the helm test pod sends one of the tokens.
    assert _volume(router, "auth-tokens")["secret"]["items"] == [{"key": "tokens.yaml", "path": "tokens.yaml"}]
    token_ref = _env(_main(release.test_pod["spec"]))["SHARDMESH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref == {"name": f"{FULL}-router-tokens", "key": "helm-test.token"}
    assert table.tenant_of(files["helm-test.token"]) in TOKENS.values()
    assert "Client auth: bearer tokens from secret" in release.notes and "WARNING" not in release.notes
    for _, _, spec in pod_templates(release):
        if spec is not router:
            assert _volume(spec, "auth-tokens") is None


def test_client_tokens_from_an_existing_secret(chart: Any) -> None:
    release = render(chart, {"router": {"auth": {"existingSecret": "tokens", "secretKey": "t.yaml"}}})
    assert not any(s["metadata"]["name"].endswith("-router-tokens") for s in release.of_kind("Secret"))
    assert parse_cli(_main(release.router["spec"]["template"]["spec"])).auth_tokens_file == "/etc/shardmesh/auth/t.yaml"
    assert "SHARDMESH_TOKEN" not in _env(_main(release.test_pod["spec"]))
    assert "`helm test` has no token and will get UNAUTHENTICATED" in release.notes
    with_token = render(chart, {"router": {"auth": {"existingSecret": "tokens"}}, "test": {"tokenSecret": {"name": "tok", "key": "t"}}})
    assert _env(_main(with_token.test_pod["spec"]))["SHARDMESH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tok", "key": "t"}
    assert "has no token" not in with_token.notes


def test_client_auth_is_off_unless_configured_and_notes_warn(chart: Any) -> None:
    release = render(chart)
    assert "--auth-tokens-file" not in _main(release.router["spec"]["template"]["spec"])["args"]
    assert "WARNING: client authentication is OFF: any holder of a client certificate may use the model." in release.notes
    plaintext = render(chart, {"tls": {"enabled": False}})
    assert "WARNING: client authentication is OFF: any client that reaches the router may use the model." in plaintext.notes


def test_rate_and_text_limits_render_only_when_set(chart: Any) -> None:
    args = parse_cli(_main(render(chart, {"router": {"rateLimitRps": 12.5, "maxTextBytes": 65536}}).router["spec"]["template"]["spec"]))
    assert (args.rate_limit_rps, args.max_text_bytes) == (12.5, 65536)
    plain = _main(render(chart).router["spec"]["template"]["spec"])["args"]
    assert "--rate-limit-rps" not in plain and "--max-text-bytes" not in plain


# ---------- Consul ACL token ----------


def test_consul_acl_token_from_a_value_becomes_a_secret(chart: Any) -> None:
    release = render(chart, {"consul": {"address": "consul-server.consul.svc:8500", "aclToken": {"value": "s3cr3t-acl"}}})
    assert secret_data(release, f"{FULL}-consul-acl") == {"token": "s3cr3t-acl"}
    for _, _, spec in pod_templates(release):
        env = _env(_main(spec))
        if spec is release.test_pod["spec"]:
            assert "CONSUL_HTTP_TOKEN" not in env
            continue
        assert env["CONSUL_HTTP_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": f"{FULL}-consul-acl", "key": "token"}}
        assert "s3cr3t-acl" not in str(spec), "the token travels only through the Secret"
    assert f"Consul ACL token: from secret {FULL}-consul-acl" in release.notes
    without_consul = render(chart, {"consul": {"aclToken": {"value": "s3cr3t-acl"}}})
    assert not any(s["metadata"]["name"].endswith("-consul-acl") for s in without_consul.of_kind("Secret"))
    none = render(chart, {"consul": {"address": "consul-server.consul.svc:8500"}})
    assert "Consul ACL token: none." in none.notes


# ---------- NetworkPolicy egress ----------


def test_network_policy_egress_reaches_workers_dns_and_consul_only(chart: Any) -> None:
    workers = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "shardmesh", "app.kubernetes.io/instance": RELEASE,
                                               "app.kubernetes.io/component": "worker"}}}
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    to_workers = {"to": [workers], "ports": [{"port": 50051, "protocol": "TCP"}]}
    release = render(chart)
    for name in (f"{FULL}-router", f"{FULL}-worker"):
        spec = release.one("NetworkPolicy", name)["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["egress"] == [to_workers, dns]
    extra = {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    consul = render(chart, {"consul": {"address": "consul-server.consul.svc:8500"}, "networkPolicy": {"egress": {"extra": [extra]}}})
    consul_rule = {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "consul"}}}],
                   "ports": [{"port": p, "protocol": "TCP"} for p in (8500, 8501, 8502, 8503)]}
    for name in (f"{FULL}-router", f"{FULL}-worker"):
        assert consul.one("NetworkPolicy", name)["spec"]["egress"] == [to_workers, dns, consul_rule, extra]
    ingress_only = render(chart, {"networkPolicy": {"egress": {"enabled": False}}})
    for policy in ingress_only.of_kind("NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]


# ---------- everything off, for a dev cluster ----------


def test_a_dev_cluster_can_turn_every_default_off(chart: Any) -> None:
    release = render(chart, {"tls": {"enabled": False}, "networkPolicy": {"enabled": False}, "meshKey": {"enabled": False}})
    assert release.of_kind("Secret") == [] and release.of_kind("NetworkPolicy") == []
    for owner, _, spec in pod_templates(release):
        args = parse_cli(_main(spec), f"{owner['metadata']['name']}-0")
        assert args.tls_cert is None and args.tls_ca is None and getattr(args, "health_listen", None) is None
        assert {v["name"] for v in spec["volumes"]} <= {"tmp", "cache"}
    for line in ("TLS: OFF", "NetworkPolicy: OFF", "Mesh key: OFF"):
        assert line in release.notes
