"""Renders helm/shardmesh with Helm's own engine (helm-python-sdk) and validates it with kubernetes-validate.

helm-python-sdk binds, through ctypes, to ``libhelm_c.so``, Helm's Go SDK compiled into a shared library that
ships inside the wheel (``helm_python/lib``). Loading, linting, schema validation and rendering read only the
chart directory: nothing is downloaded and no cluster or ``helm`` binary is needed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from services.cli.parser import build_parser

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "shardmesh"
RELEASE = "demo"
NAMESPACE = "ml"
# The newest Kubernetes version kubernetes-validate ships schemas for.
KUBE_VERSION = kubernetes_validate.utils.latest_version()
# kubernetes-validate re-reads and parses its schema files (the definitions file alone takes ~80 ms) on every
# validate() call; they never change and are only read, so parse each once for the whole session.
if not hasattr(kubernetes_validate.utils.schema_contents, "cache_info"):
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
# Labels that never change across upgrades: the only ones selectors may use.
STABLE_LABELS = frozenset(
    {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component", "shardmesh.io/shard-group"}
)
# What the downward API gives each pod, for substituting $(VAR) in container args.
POD_ENV_SAMPLE = {"POD_IP": "10.1.2.3", "HOST_IP": "192.168.0.7"}


@dataclass
class Release:
    """One rendering of the chart: its objects (from the chart's own templates), NOTES.txt and merged values."""

    objects: list[dict[str, Any]]
    notes: str
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    @property
    def router(self) -> dict[str, Any]:
        return self.one("Deployment", f"{RELEASE}-shardmesh-router")

    @property
    def statefulsets(self) -> list[dict[str, Any]]:
        return self.of_kind("StatefulSet")

    @property
    def test_pod(self) -> dict[str, Any]:
        return self.one("Pod", f"{RELEASE}-shardmesh-test-infer")


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Release:
    """Renders like `helm install demo helm/shardmesh -n ml -f values` (schema validated by the engine)."""
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return _release(chart, manifests, values)


def render_upgrade(chart: helm.Chart, config: helm.Config, values: dict[str, Any] | None = None) -> Release:
    """Renders like `helm upgrade demo helm/shardmesh -n ml -f values` against the cluster of ``config``: the
    chart's `lookup` calls see that cluster's objects."""
    manifests = config.render(chart, values or {}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    return _release(chart, manifests, values)


def _release(chart: helm.Chart, manifests: dict[str, str], values: dict[str, Any] | None) -> Release:
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if not path.startswith("shardmesh/templates/"):
            continue  # a vendored subchart (consul) renders its own objects; they are not ours to check
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Release(objects=objects, notes=notes, values=chart.merge_values(values or {}))


# cert-manager's kinds are CRDs kubernetes-validate has no schema for: the fields the chart may set, per kind.
CERT_MANAGER_SPEC_KEYS = {
    "Issuer": {"selfSigned", "ca"},
    "Certificate": {"secretName", "commonName", "dnsNames", "ipAddresses", "duration", "renewBefore", "usages",
                    "privateKey", "issuerRef", "isCA"},
}
CERT_MANAGER_USAGES = {"digital signature", "key encipherment", "server auth", "client auth", "cert sign"}


def _validate_cert_manager(obj: dict[str, Any]) -> None:
    kind, spec = obj["kind"], obj.get("spec", {})
    assert obj["apiVersion"] == "cert-manager.io/v1" and kind in CERT_MANAGER_SPEC_KEYS, f"unexpected {obj['apiVersion']} {kind}"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"} and spec, obj["metadata"]["name"]
    assert set(spec) <= CERT_MANAGER_SPEC_KEYS[kind], f"{kind}/{obj['metadata']['name']}: unknown {set(spec) - CERT_MANAGER_SPEC_KEYS[kind]}"
    if kind == "Certificate":
        assert spec["secretName"] and set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
        assert set(spec.get("usages", [])) <= CERT_MANAGER_USAGES
        assert spec["privateKey"]["algorithm"] in ("RSA", "ECDSA", "Ed25519")
    elif kind == "Issuer":
        assert len(spec) == 1, f"an Issuer has one type, got {sorted(spec)}"


def validate_k8s(obj: dict[str, Any]) -> None:
    """Strict validation against the newest Kubernetes OpenAPI schema kubernetes-validate ships (cert-manager's
    CRDs, which it has no schema for, against the fields the chart uses)."""
    if obj["apiVersion"].startswith("cert-manager.io/"):
        _validate_cert_manager(obj)
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {KUBE_VERSION} at {where}: {exc.message}")


def pod_templates(release: Release) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(owner object, pod metadata, pod spec) for every workload and bare pod."""
    out = []
    for obj in release.objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            tmpl = obj["spec"]["template"]
            out.append((obj, tmpl["metadata"], tmpl["spec"]))
        elif obj["kind"] == "Pod":
            out.append((obj, obj["metadata"], obj["spec"]))
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("shardmesh parser has no subcommands")


def expand_env_refs(args: list[str], container: dict[str, Any], pod_name: str) -> list[str]:
    """Substitutes $(VAR) the way the kubelet does; every referenced variable must be defined in the container."""
    defined = {e["name"] for e in container.get("env", [])}
    sample = {**POD_ENV_SAMPLE, "POD_NAME": pod_name}
    expanded = []
    for arg in args:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            assert var in defined, f"{container['name']}: argument {arg!r} uses $({var}), which is not in its env"
            arg = arg.replace(f"$({var})", sample.get(var, f"value-of-{var}"))
        expanded.append(arg)
    return expanded


def parse_cli(container: dict[str, Any], pod_name: str = "pod-0") -> argparse.Namespace:
    """Checks a rendered `shardmesh ...` container against the installed CLI and returns the parsed flags.

    Every `--flag` must be an option of that subcommand spelled out in full (argparse would also accept a
    prefix), and the whole argv must parse with `build_parser().parse_args`.
    """
    assert container.get("command") == ["shardmesh"], f"{container['name']}: command is {container.get('command')}"
    argv = expand_env_refs([str(a) for a in container.get("args", [])], container, pod_name)
    sub = subparser(argv[0])
    for token in argv[1:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in sub._option_string_actions, (
                f"{container['name']}: `shardmesh {argv[0]}` has no option {flag}; "
                f"known: {sorted(o for o in sub._option_string_actions if o.startswith('--'))}"
            )
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{container['name']}: `shardmesh {' '.join(argv)}` does not parse:\n{stderr.getvalue()}")


def secret_data(release: Release, name: str) -> dict[str, str]:
    """A Secret the chart renders, as text: ``data`` decoded and ``stringData`` merged."""
    secret = release.one("Secret", name)
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def container_port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"{container['name']} has no port named {name}"
    return int(ports[name])
