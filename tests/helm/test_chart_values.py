"""Lint, the Consul dependency declaration, and values the chart must refuse with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.helm.rendering import CHART_DIR, KUBE_VERSION, render

pytestmark = pytest.mark.helm

MISSING_CONSUL = "chart directory is missing these dependencies: consul"


def _consul_vendored() -> bool:
    return any(d["name"] == "consul" and d["status"] == "ok" for d in helm.dependency_list(CHART_DIR))


def test_engine_is_bundled_helm_v4() -> None:
    """The SDK runs Helm's Go engine from a shared library inside the wheel: nothing to download."""
    package_dir = Path(helm.__file__).resolve().parent
    assert Path(helm.library_path).resolve().is_relative_to(package_dir)
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"consul": {"address": "consul:8500", "registration": "connect-inject"}, "tls": {"enabled": False}},
        {"tls": {"enabled": True, "secretName": "t"}, "networkPolicy": {"enabled": True}},
        {"tls": {"certManager": {"enabled": True}}, "router": {"auth": {"tokens": {"x" * 16: "a"}}}},
        {"tls": {"enabled": False}, "networkPolicy": {"enabled": False}, "meshKey": {"enabled": False}},
        {"model": "/models/m", "weights": {"source": "init"}},
    ],
    ids=["defaults", "connect-inject", "tls-secret", "cert-manager-auth", "dev-insecure", "weights-init"],
)
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    allowed = [] if _consul_vendored() else [MISSING_CONSUL]
    assert problems == allowed, problems


def test_consul_chart_is_an_optional_dependency() -> None:
    chart_yaml = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    (dep,) = [d for d in chart_yaml["dependencies"] if d["name"] == "consul"]
    assert dep["repository"] == "https://helm.releases.hashicorp.com"
    assert dep["condition"] == "consul.enabled"
    listed = {d["name"]: d for d in helm.dependency_list(CHART_DIR)}
    assert listed["consul"]["status"] in ("ok", "missing")
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["consul"]["enabled"] is False, "the default install must not need the dependency"


def test_schema_accepts_the_defaults(chart: Any) -> None:
    chart.validate_schema(chart.values)


def _shards(**entry: Any) -> dict[str, Any]:
    return {"shards": [{"name": "s0", "layers": "0:3", "replicas": 1, **entry}]}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (_shards(replicas=0), ["/shards/0/replicas", "minimum"]),
        (_shards(replica=2), ["/shards/0", "additional properties 'replica' not allowed"]),
        (_shards(layers="0-3"), ["/shards/0/layers", "does not match pattern"]),
        (_shards(layers="a:b"), ["/shards/0/layers", "does not match pattern"]),
        (_shards(layers="-1:3"), ["/shards/0/layers", "does not match pattern"]),
        (_shards(name="S_0"), ["/shards/0/name", "does not match pattern"]),
        ({"shards": []}, ["/shards", "minItems"]),
        ({"router": {"replicas": 0}}, ["/router/replicas", "minimum"]),
        ({"router": {"mode": "fast"}}, ["/router/mode"]),
        ({"worker": {"wireDtype": "int8"}}, ["/worker/wireDtype"]),
        ({"replicas": 3}, ["additional properties 'replicas' not allowed"]),
        ({"router": {"listen": "0.0.0.0:1"}}, ["/router", "additional properties 'listen' not allowed"]),
        ({"weights": {"source": "s3"}}, ["/weights/source"]),
        ({"consul": {"registration": "sidecar"}}, ["/consul/registration"]),
        ({"consul": {"address": "http://consul:8500"}}, ["/consul/address", "does not match pattern"]),
        ({"router": {"ejectAfterFailures": 0}}, ["/router/ejectAfterFailures", "minimum"]),
        ({"router": {"ejectBaseS": 0}}, ["/router/ejectBaseS"]),
        ({"worker": {"healthPort": 70000}}, ["/worker/healthPort", "maximum"]),
        ({"router": {"auth": {"tokens": {"short": "team-a"}}}}, ["/router/auth/tokens", "additional properties 'short' not allowed"]),
        ({"router": {"auth": {"tokens": {"x" * 16: ""}}}}, ["/router/auth/tokens", "minLength"]),
        ({"router": {"rateLimitRps": 0}}, ["/router/rateLimitRps"]),
        ({"router": {"maxTextBytes": 0}}, ["/router/maxTextBytes", "minimum"]),
        ({"tls": {"certManager": {"duration": "90 days"}}}, ["/tls/certManager/duration", "does not match pattern"]),
        ({"meshKey": {"secretKey": "a/b"}}, ["/meshKey/secretKey", "does not match pattern"]),
        ({"networkPolicy": {"egress": {"consul": {"ports": []}}}}, ["/networkPolicy/egress/consul/ports", "minItems"]),
        ({"tls": {"generated": {"validityDays": 0}}}, ["/tls/generated/validityDays", "minimum"]),
    ],
    ids=[
        "replicas-0", "unknown-shard-key", "layers-dash", "layers-letters", "layers-negative", "bad-group-name",
        "no-shards", "router-replicas-0", "bad-mode", "bad-dtype", "unknown-top-level-key", "unknown-router-key",
        "bad-weights-source", "bad-registration", "consul-address-url", "eject-after-0", "eject-base-0",
        "health-port-too-big", "short-token", "empty-tenant", "rate-limit-0", "max-text-0", "cert-duration",
        "mesh-key-path", "no-consul-ports", "validity-0",
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(helm.HelmValuesError) as schema_error:
        chart.validate_schema(chart.merge_values(values))
    with pytest.raises(helm.HelmValuesError) as install_error:
        render(chart, values)  # what `helm install` does: the engine validates before rendering
    for message in (str(schema_error.value), str(install_error.value)):
        for fragment in expected:
            assert fragment in message, message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (_shards(layers="5:3"), 'shards[0] (s0): layer range "5:3" is empty: END must be greater than START'),
        (_shards(layers="3:3"), 'shards[0] (s0): layer range "3:3" is empty'),
        (
            {"shards": [{"name": "a", "layers": "0:3", "replicas": 1}, {"name": "a", "layers": "3:6", "replicas": 1}]},
            'shards[1]: shard group name "a" is used twice',
        ),
        ({"fullnameOverride": "x" * 40, **_shards(name="long-group-name")}, "longer than 52 characters"),
        ({"weights": {"source": "pvc"}, "model": "/models/m"}, "set weights.pvc.claimName"),
        ({"weights": {"source": "init"}}, 'model "minilm" must be a directory under weights.mountPath "/models"'),
        (
            {"tls": {"secretName": "t", "certManager": {"enabled": True}}},
            "set either tls.secretName (an existing Secret) or tls.certManager.enabled",
        ),
        (
            {"consul": {"address": "c:8500", "registration": "connect-inject"}},
            "tls.enabled with consul.registration=connect-inject: consul-k8s registers the worker pods' IP addresses",
        ),
        (
            {"consul": {"address": "c:8500", "aclToken": {"secretName": "acl", "value": "x"}}},
            "consul.aclToken: set either secretName (an existing Secret) or value",
        ),
        (
            {"router": {"auth": {"existingSecret": "tok", "tokens": {"x" * 16: "a"}}}},
            "router.auth: set either existingSecret (an existing Secret) or tokens",
        ),
        ({"worker": {"graceS": 30}}, "worker.graceS (30 s) must be shorter than worker.terminationGracePeriodSeconds (30 s)"),
        ({"consul": {"enabled": True}}, "consul.registration=agent needs Consul client agents"),
        ({"consul": {"enabled": True, "registration": "catalog-sync"}, "tls": {"enabled": False}}, "set consul.syncCatalog.enabled=true"),
        (
            {"tls": {"enabled": True, "secretName": "t"}, "worker": {"healthPort": 50051}},
            "worker.port and worker.healthPort are both 50051: each listener of the worker needs its own port",
        ),
        ({"router": {"metricsPort": 50050}}, "router.port and router.metricsPort are both 50050"),
    ],
    ids=["layers-5:3", "layers-empty", "duplicate-group", "name-too-long", "pvc-without-claim", "init-model-not-under-mount",
         "tls-secret-and-cert-manager", "tls-with-connect-inject", "acl-token-twice", "tokens-twice",
         "grace-longer-than-termination", "consul-agent-without-clients", "catalog-sync-without-sync",
         "health-port-clash", "metrics-port-clash"],
)
def test_template_checks_what_the_schema_cannot(chart: Any, values: dict[str, Any], expected: str) -> None:
    chart.validate_schema(chart.merge_values(values))  # well-formed as far as JSON schema can tell ...
    with pytest.raises(helm.HelmRenderError) as error:
        render(chart, values)  # ... but the chart refuses it with a message saying what to change
    assert expected in str(error.value)
