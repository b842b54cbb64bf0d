"""A loopback stand-in for the Kubernetes API, just enough for Helm's ``lookup`` of Secrets.

helm-python-sdk's ``Config.render`` renders "cluster-aware": the chart's ``lookup`` calls go to the API server
named in a kubeconfig. Serving the Secrets of a previous rendering from here shows what `helm upgrade` does
with the Secrets the chart generates (certificates, mesh key), through Helm's real lookup and client code.
Serves ``GET /api/v1`` (discovery) and ``GET /api/v1/namespaces/<ns>/secrets/<name>``; everything else is 404.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SECRETS_RESOURCE = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [{"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret", "verbs": ["get", "list"]}],
}
_NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}


class FakeKube:
    """Secrets by (namespace, name); ``requests`` records every path asked for."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        self.port = 0

    def store(self, objects: list[dict[str, Any]], namespace: str) -> None:
        for obj in objects:
            if obj["kind"] == "Secret":
                self.secrets[(namespace, obj["metadata"]["name"])] = obj

    def kubeconfig(self, namespace: str) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: fake, user: {token: fake}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
            "current-context: fake\n"
        )

    def answer(self, path: str) -> dict[str, Any] | None:
        self.requests.append(path)
        parts = path.split("?", 1)[0].strip("/").split("/")
        if parts == ["api", "v1"]:
            return _SECRETS_RESOURCE
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
            return self.secrets.get((parts[3], parts[5]))
        return None


@contextmanager
def fake_kube() -> Iterator[FakeKube]:
    kube = FakeKube()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = kube.answer(self.path)
            data = json.dumps(body if body is not None else _NOT_FOUND).encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    kube.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="fake-kube", daemon=True)
    thread.start()
    try:
        yield kube
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
