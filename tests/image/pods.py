"""Runs the chart's rendered pods as podman containers, translating each setting the way the kubelet applies it.

What is taken from the rendered pod spec (nothing is restated here): command and args (with `$(VAR)` expanded
from the container's env, as the kubelet does), env (downward-API fields filled with the pod's name and
address), the pod and container securityContext (runAsUser/runAsGroup/fsGroup, readOnlyRootFilesystem,
capabilities, allowPrivilegeEscalation), volumes and volumeMounts (emptyDir -> a fresh podman volume, mode 0777
and group fsGroup like the kubelet's; Secret -> a read-only directory holding the rendered Secret's files with
its defaultMode, group fsGroup), container ports, probes (grpc.health.v1 on the probe port, from the host like
the kubelet from the node) and terminationGracePeriodSeconds (the `podman stop` timeout after SIGTERM).

Pods get static addresses on one podman network; per-pod DNS names (what the chart's static --workers list and
the worker certificates use) resolve through --add-host entries, as cluster DNS would resolve them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PODMAN = "podman"
IMAGE = os.environ.get("SHARDMESH_IMAGE", "localhost/shardmesh:0.1.0")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def podman_missing_reason(image: str = IMAGE) -> str | None:
    """Why the image tests cannot run here, or None when they can."""
    if shutil.which(PODMAN) is None:
        return "podman is not installed (apt-get install podman runc; see docs/deploy.md)"
    try:
        found = podman("image", "exists", image, check=False, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman does not answer: {exc}"
    if not found:
        return f"image {image} is not built (scripts/image.sh build, or set SHARDMESH_IMAGE)"
    return None


@dataclass
class Pod:
    """One running container made from a rendered pod template's container."""

    name: str
    ip: str
    container: str
    spec: dict[str, Any]
    main: dict[str, Any]
    published: dict[int, int] = field(default_factory=dict)  # container port -> host port on 127.0.0.1

    @property
    def grace_s(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    def probe_port(self, kind: str = "startupProbe") -> int:
        return int(self.main[kind]["grpc"]["port"])


class PodmanCluster:
    """A podman network standing in for one namespace; owns every container, volume and directory it makes."""

    def __init__(self, root: Path, image: str = IMAGE) -> None:
        self.image = image
        self.root = root
        self.tag = f"smtest-{uuid.uuid4().hex[:8]}"
        self.network = self.tag
        octet = int(self.tag[-2:], 16) % 200 + 20
        self.subnet_prefix = f"10.213.{octet}"
        self.gateway = f"{self.subnet_prefix}.1"
        self.hosts: dict[str, str] = {}
        self.pods: list[Pod] = []
        self.volumes: list[str] = []
        self._next_ip = 10
        podman("network", "create", "--subnet", f"{self.subnet_prefix}.0/24", "--gateway", self.gateway, self.network)

    # ---------- addresses ----------

    def allocate(self, pod_name: str, dns_names: Sequence[str] = ()) -> str:
        """The pod's static address; ``dns_names`` resolve to it in every container started afterwards."""
        ip = f"{self.subnet_prefix}.{self._next_ip}"
        self._next_ip += 1
        for name in dns_names:
            self.hosts[name] = ip
        self.hosts.setdefault(pod_name, ip)
        return ip

    # ---------- volumes ----------

    def empty_dir(self, fs_group: int | None) -> str:
        """A fresh volume with the kubelet's emptyDir ownership: mode 0777, or group fsGroup with setgid."""
        name = f"{self.tag}-v{len(self.volumes)}"
        podman("volume", "create", name)
        self.volumes.append(name)
        path = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
        if fs_group is None:
            path.chmod(0o777)
        else:
            os.chown(path, 0, fs_group)
            path.chmod(0o2777)
        return name

    def secret_dir(self, secret: dict[str, Any], volume: dict[str, Any], fs_group: int | None) -> Path:
        spec = volume["secret"]
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
        items = spec.get("items") or [{"key": k, "path": k} for k in data]
        target = self.root / f"secret-{secret['metadata']['name']}-{uuid.uuid4().hex[:6]}"
        target.mkdir(parents=True)
        target.chmod(0o755)
        mode = int(spec.get("defaultMode", 0o644))
        for item in items:
            path = target / item["path"]
            path.write_bytes(data[item["key"]])
            os.chown(path, 0, fs_group if fs_group is not None else 0)
            path.chmod(int(item.get("mode", mode)))
        return target

    # ---------- containers ----------

    def run(
        self,
        pod_name: str,
        spec: dict[str, Any],
        container: dict[str, Any],
        secrets: dict[str, dict[str, Any]],
        ip: str,
        *,
        publish: tuple[int, ...] = (),
        volumes_by_name: dict[str, str] | None = None,
        detach: bool = True,
        timeout: float = 120,
    ) -> Pod | subprocess.CompletedProcess[str]:
        """Starts one container of a pod spec (detached), or runs it to completion (detach=False, an init container)."""
        cname = f"{self.tag}-{pod_name}-{container['name']}"
        pod = Pod(name=pod_name, ip=ip, container=cname, spec=spec, main=container)
        args = self.container_args(pod, secrets, publish, {} if volumes_by_name is None else volumes_by_name)
        if not detach:
            return podman("run", "--rm", "--name", cname, *args, check=False, timeout=timeout)
        podman("run", "-d", "--name", cname, *args)
        for port in publish:
            out = podman("port", cname, f"{port}/tcp").stdout.strip().splitlines()[0]
            pod.published[port] = int(out.rsplit(":", 1)[1])
        self.pods.append(pod)
        return pod

    def container_args(
        self, pod: Pod, secrets: dict[str, dict[str, Any]], publish: tuple[int, ...], volumes_by_name: dict[str, str]
    ) -> list[str]:
        """`podman run` options and arguments for ``pod.main``; fills ``volumes_by_name`` with the pod's volumes."""
        pod_name, spec, container, ip = pod.name, pod.spec, pod.main, pod.ip
        pod_sc = spec.get("securityContext", {})
        sc = {**pod_sc, **container.get("securityContext", {})}
        fs_group = pod_sc.get("fsGroup")
        args = ["--network", self.network, "--ip", ip, "--hostname", pod_name]
        for host, addr in sorted(self.hosts.items()):
            args += ["--add-host", f"{host}:{addr}"]
        # securityContext
        if "runAsUser" in sc:
            args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        if fs_group is not None:
            args += ["--group-add", str(fs_group)]
        if sc.get("readOnlyRootFilesystem"):
            # Kubernetes adds no tmpfs of its own: only the pod's volumes are writable.
            args += ["--read-only", "--read-only-tmpfs=false"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        for cap in sc.get("capabilities", {}).get("add", []):
            args += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        # env
        env = self.env(pod_name, container, ip)
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        # volumes
        for volume in spec.get("volumes", []):
            if volume["name"] in volumes_by_name:
                continue
            if "emptyDir" in volume:
                volumes_by_name[volume["name"]] = self.empty_dir(fs_group)
            elif "secret" in volume:
                secret = secrets[volume["secret"]["secretName"]]
                volumes_by_name[volume["name"]] = str(self.secret_dir(secret, volume, fs_group))
            else:
                raise AssertionError(f"{pod_name}: volume {volume['name']} is neither emptyDir nor secret")
        for mount in container.get("volumeMounts", []):
            source = volumes_by_name[mount["name"]]
            options = ["ro" if mount.get("readOnly") else "rw"]
            if not source.startswith("/"):
                options.append("nocopy")  # an emptyDir starts empty: no copy of the image's directory
            args += ["--volume", f"{source}:{mount['mountPath']}:{','.join(options)}"]
        for port in publish:
            args += ["--publish", f"127.0.0.1::{port}"]
        # command and args ($(VAR) expanded from the container's env, as the kubelet does)
        command = container.get("command") or []
        argv = [expand(str(a), env) for a in container.get("args", [])]
        if command:
            args += ["--entrypoint", command[0]]
        args.append(self.image)
        args += [expand(c, env) for c in command[1:]] + argv
        return args

    def env(self, pod_name: str, container: dict[str, Any], ip: str) -> dict[str, str]:
        fields = {"metadata.name": pod_name, "status.podIP": ip, "status.hostIP": self.gateway}
        out: dict[str, str] = {}
        for entry in container.get("env", []):
            if "value" in entry:
                out[entry["name"]] = expand(str(entry["value"]), out)
            else:
                ref = entry["valueFrom"].get("fieldRef")
                assert ref, f"{container['name']}: env {entry['name']} is neither a value nor a fieldRef"
                out[entry["name"]] = fields[ref["fieldPath"]]
        return out

    def stop(self, pod: Pod) -> tuple[int, float]:
        """SIGTERM, then SIGKILL after the pod's grace period (as the kubelet does): (exit code, seconds taken)."""
        start = time.monotonic()
        podman("stop", "--time", str(pod.grace_s), pod.container, timeout=pod.grace_s + 60)
        elapsed = time.monotonic() - start
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", pod.container).stdout.strip())
        return code, elapsed

    def logs(self, pod: Pod) -> str:
        out = podman("logs", pod.container, check=False)
        return (out.stdout + out.stderr)[-4000:]

    def close(self) -> None:
        for pod in self.pods:
            podman("rm", "-f", "-t", "0", pod.container, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "-f", volume, check=False)
        podman("network", "rm", "-f", self.network, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) substitution: defined variables are replaced, others left as they are."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)
