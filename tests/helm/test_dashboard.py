"""The chart's Grafana dashboard ConfigMap and optional ServiceMonitor, rendered by Helm's engine.

Every metric the dashboard queries must be one the code defines: the names come from prometheus_client's
registry after importing the modules that define them, not from a list kept by hand.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.helm.rendering import NAMESPACE, RELEASE, Release, render, selects, validate_k8s

pytestmark = pytest.mark.helm

DASHBOARD = f"{RELEASE}-shardmesh-dashboard"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
# Modules whose import registers every shardmesh metric (router and worker processes import all of them).
METRIC_MODULES = (
    "services.telemetry",
    "services.wire.shm",
    "services.transport.stream_server",
    "services.transport.stream_client",
    "router.core",
    "router.pipeline",
    "router.planning.outlier",
    "router.scheduling.metrics",
    "router.result_cache",
    "shard_worker.engine",
    "shard_worker.sessions",
)
# What the issue asks the dashboard to show.
REQUIRED_ON_DASHBOARD = (
    "shardmesh_queue_seconds_bucket",
    "shardmesh_worker_queue_seconds_bucket",
    "shardmesh_worker_compute_seconds_bucket",
    "shardmesh_worker_batch_size_sum",
    "shardmesh_hop_seconds_bucket",
    "shardmesh_failovers_total",
    "shardmesh_ejections_total",
    "shardmesh_kv_cache_bytes",
    "shardmesh_sessions",
    "shardmesh_shm_in_flight_bytes",
    "shardmesh_streams_open",
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def _families() -> dict[str, str]:
    """shardmesh metric family name -> type, from the registry."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    return {m.name: m.type for m in REGISTRY.collect() if m.name.startswith("shardmesh_")}


def _sample_names() -> set[str]:
    return {family + suffix for family, kind in _families().items() for suffix in _SUFFIXES[kind]}


def _dashboard(release: Release) -> dict[str, Any]:
    config_map = release.one("ConfigMap", DASHBOARD)
    (text,) = config_map["data"].values()
    return json.loads(text)


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    return exprs


@pytest.fixture(scope="module")
def default_release(chart: Any) -> Release:
    return render(chart)


def test_dashboard_config_map_carries_the_sidecar_label_and_valid_json(default_release: Release) -> None:
    config_map = default_release.one("ConfigMap", DASHBOARD)
    validate_k8s(config_map)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    dashboard = _dashboard(default_release)
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} queries nothing"
            assert panel["fieldConfig"]["defaults"]["unit"], f"panel {panel['title']!r} has no unit"


def test_every_metric_the_dashboard_queries_is_defined_by_the_code(default_release: Release) -> None:
    defined = _sample_names()
    queried = {name for expr in _exprs(_dashboard(default_release)) for name in re.findall(r"\bshardmesh_\w+", expr)}
    assert queried, "the dashboard queries no shardmesh metric"
    unknown = sorted(queried - defined)
    assert not unknown, f"the dashboard queries metrics no module defines: {unknown}"
    missing = sorted(set(REQUIRED_ON_DASHBOARD) - queried)
    assert not missing, f"the dashboard does not show {missing}"


def test_metric_names_follow_prometheus_conventions_and_are_documented() -> None:
    families = _families()
    docs = DOCS.read_text()
    for name, kind in families.items():
        assert re.fullmatch(r"shardmesh_[a-z0-9_]+", name), name
        assert not re.search(r"_(ms|milliseconds|us|mb|mib|kb|percent)$", name), f"{name}: use base units"
        if kind == "histogram" and name != "shardmesh_worker_batch_size":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: a histogram of time or size names its unit"
        if kind == "counter":
            assert f"{name}_total" in docs, f"{name}_total is not documented in {DOCS.name}"
        else:
            assert name in docs, f"{name} is not documented in {DOCS.name}"


def test_dashboard_can_be_turned_off_and_relabelled(chart: Any) -> None:
    assert not render(chart, {"metrics": {"dashboard": {"enabled": False}}}).of_kind("ConfigMap")
    # Helm merges maps: a sidecar with another label sets it and nulls the default one.
    labels = {"dash": "yes", "grafana_dashboard": None}
    release = render(chart, {"metrics": {"dashboard": {"labels": labels, "annotations": {"grafana_folder": "ml"},
                                                       "namespace": "monitoring"}}})
    config_map = release.one("ConfigMap", DASHBOARD)
    assert config_map["metadata"]["labels"]["dash"] == "yes" and "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ml"}
    assert config_map["metadata"]["namespace"] == "monitoring"


SERVICE_MONITOR_SPEC = {"namespaceSelector", "selector", "endpoints"}
ENDPOINT_KEYS = {"port", "path", "scheme", "interval", "scrapeTimeout"}
DURATION = re.compile(r"([0-9]+(ms|s|m|h))+")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h)", duration))


def test_service_monitor_is_off_by_default(default_release: Release) -> None:
    assert not default_release.of_kind("ServiceMonitor")


def test_service_monitor_scrapes_the_router_and_every_worker_metrics_port(chart: Any) -> None:
    """ServiceMonitor is a CRD kubernetes-validate has no schema for: its structure is checked here, against
    monitoring.coreos.com/v1 fields, and its selector against the Services the chart renders."""
    release = render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s",
                                                            "labels": {"release": "kube-prometheus-stack"}}}})
    (monitor,) = release.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == SERVICE_MONITOR_SPEC
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = spec["selector"]
    assert set(selector) <= {"matchLabels", "matchExpressions"}
    for expr in selector.get("matchExpressions", []):
        assert set(expr) == {"key", "operator", "values"} and expr["operator"] in ("In", "NotIn")
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= ENDPOINT_KEYS and endpoint["scheme"] == "http" and endpoint["path"] == "/metrics"
        assert DURATION.fullmatch(endpoint["interval"]) and DURATION.fullmatch(endpoint["scrapeTimeout"])
        assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])

    def matches(labels: dict[str, str]) -> bool:
        if not selects(selector.get("matchLabels", {}), labels):
            return False
        for expr in selector.get("matchExpressions", []):
            inside = labels.get(expr["key"]) in expr["values"]
            if inside != (expr["operator"] == "In"):
                return False
        return True

    scraped = [s for s in release.of_kind("Service") if matches(s["metadata"]["labels"])]
    components = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped}
    assert components == {"router", "worker"}
    assert len([s for s in scraped if s["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]) == len(
        release.values["shards"]
    ), "every shard group's Service is scraped"
    port_names = {e["port"] for e in spec["endpoints"]}
    for service in scraped:
        assert port_names <= {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]


def test_bad_scrape_interval_is_refused_by_the_schema(chart: Any) -> None:
    with pytest.raises(Exception, match="interval"):
        render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "interval": "30 seconds"}}})
