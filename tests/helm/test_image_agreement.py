"""The chart's defaults and the image agree: user and group, writable paths, ports, environment, entrypoint and
tag. Read from the Dockerfile's text and the chart (values.yaml and its rendering), so it runs without podman;
tests/image/test_image.py checks the same settings against the built image by running it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.helm.rendering import CHART_DIR, pod_templates, render

pytestmark = pytest.mark.helm

REPO = Path(__file__).resolve().parents[2]


def parse_dockerfile(text: str) -> dict[str, Any]:
    """The run stage (the last FROM) of a Dockerfile: USER, ENV, EXPOSE, ENTRYPOINT and its RUN lines, with
    ${ARG} defaults substituted. Enough for this repository's Dockerfile, not a general parser."""
    lines: list[str] = []
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        else:
            lines.append(raw.strip())
    args: dict[str, str] = {}
    stage: dict[str, Any] = {}
    for line in filter(None, lines):
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = {"env": {}, "expose": set(), "run": [], "user": None, "entrypoint": None, "args": dict(args)}
            continue
        sub = lambda s: re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: stage.get("args", args).get(m.group(1), m.group(0)), s)  # noqa: E731
        if word == "ARG":
            name, _, default = rest.partition("=")
            target = stage["args"] if stage else args
            if default or name not in target:
                target[name] = default
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                stage["env"][key] = sub(value)
        elif word == "EXPOSE":
            stage["expose"].update(int(p.split("/")[0]) for p in rest.split())
        elif word == "USER":
            stage["user"] = sub(rest)
        elif word == "ENTRYPOINT":
            stage["entrypoint"] = json.loads(rest)
        elif word == "RUN":
            stage["run"].append(sub(rest))
    return stage


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def test_parser_reads_the_run_stage() -> None:
    parsed = parse_dockerfile(
        "ARG UID=7\nFROM a AS build\nENV X=1\nFROM a AS run\nARG UID\nENV A=/c \\\n    B=${A}/d\nUSER ${UID}:${UID}\n"
        'EXPOSE 1 2/tcp\nENTRYPOINT ["x"]\n'
    )
    assert parsed["env"] == {"A": "/c", "B": "${A}/d"}  # ENV-to-ENV references are not substituted
    assert parsed["user"] == "7:7" and parsed["expose"] == {1, 2} and parsed["entrypoint"] == ["x"]


def test_user_matches_the_pod_security_context(image: dict[str, Any], values: dict[str, Any]) -> None:
    uid, gid = (int(x) for x in image["user"].split(":"))
    sc = values["podSecurityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (uid, gid, gid)
    assert uid != 0 and sc["runAsNonRoot"] and values["securityContext"]["runAsNonRoot"]


def test_writable_paths_exist_in_the_image_owned_by_its_user(image: dict[str, Any], values: dict[str, Any]) -> None:
    # The read-only root filesystem leaves only the pod's volumes writable: /tmp, the cache and the weights
    # directory. The image creates the latter two owned by its user, so a plain `docker run` works too.
    script = " ".join(image["run"])
    uid = image["user"].split(":")[0]
    for path in (values["cache"]["path"], values["weights"]["mountPath"]):
        assert re.search(rf"mkdir -p [^&]*{re.escape(path)}\b", script), f"the image does not create {path}"
        assert re.search(rf"chown {uid}:{uid} [^&]*{re.escape(path)}\b", script), f"{path} is not owned by {uid}"


def test_environment_matches(image: dict[str, Any], values: dict[str, Any]) -> None:
    env = image["env"]
    cache = values["cache"]["path"].rstrip("/")
    assert env["SHARDMESH_CACHE"] == cache
    assert env["HF_HOME"] == f"{cache}/huggingface"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_exposed_ports_are_the_chart_defaults(image: dict[str, Any], values: dict[str, Any]) -> None:
    chart_ports = {values[c][k] for c in ("router", "worker") for k in ("port", "metricsPort", "healthPort")}
    assert image["expose"] == chart_ports


def test_rendered_pods_agree_with_the_image(image: dict[str, Any], values: dict[str, Any]) -> None:
    """Every container the chart renders (router, workers, the weights init container, the helm test pod) runs
    the image's entrypoint as its user, with the image's values for the variables both set."""
    uid, gid = (int(x) for x in image["user"].split(":"))
    renders = [{}, {"model": "/models/smollm2", "weights": {"source": "init"}}]
    seen = set()
    with helm.Chart.load(CHART_DIR) as chart:
        for extra in renders:
            for _owner, _meta, spec in pod_templates(render(chart, extra)):
                pod_sc = spec.get("securityContext", {})
                for container in [*spec.get("initContainers", []), *spec["containers"]]:
                    seen.add(container["name"])
                    sc = {**pod_sc, **container.get("securityContext", {})}
                    assert (sc.get("runAsUser"), sc.get("runAsGroup")) == (uid, gid), container["name"]
                    assert sc.get("readOnlyRootFilesystem") is True, container["name"]
                    assert container.get("command") == image["entrypoint"], container["name"]
                    for entry in container.get("env", []):
                        if entry["name"] in image["env"] and "value" in entry:
                            assert entry["value"] == image["env"][entry["name"]], (container["name"], entry["name"])
                    for port in container.get("ports", []):
                        assert port["containerPort"] in image["expose"], (container["name"], port)
    assert {"router", "worker", "weights"} <= seen, seen


def test_default_tag_is_the_package_version(values: dict[str, Any]) -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version and chart["appVersion"] == version.group(1)
    assert values["image"]["repository"] == "shardmesh" and values["image"]["tag"] == ""
    # scripts/image.sh tags localhost/shardmesh:<pyproject version>: the chart's default image on a local runtime.
    assert 'IMAGE="${SHARDMESH_IMAGE:-localhost/shardmesh:${VERSION}}"' in (REPO / "scripts" / "image.sh").read_text()
