"""``shardmesh up`` and ``worker`` report configuration problems clearly and clean up after failures."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from tests.procs import CLI, Proc

pytestmark = [pytest.mark.integration]


def _up(tmp_path: Path, config: dict[str, object]) -> Proc:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    return Proc([*CLI, "up", str(path)])


def test_unknown_key_is_named(tmp_path: Path) -> None:
    proc = _up(tmp_path, {"model": "minilm", "workers": [{"layers": "0:6", "gpus": 2}]})
    assert proc.wait(60) == 2
    assert "unknown key(s) gpus" in "\n".join(proc.stderr)


def test_child_dying_at_start_up_stops_the_rest(tmp_path: Path) -> None:
    proc = _up(tmp_path, {"model": "minilm", "workers": [{"layers": "0:3"}, {"layers": "3:7"}]})
    assert proc.wait(180) != 0
    err = "\n".join(proc.stderr)
    assert "w1 exited with code" in err and "layer range 3:7 is beyond model 'minilm', which has 6 layers" in err
    assert not any(line.startswith("ready") for line in proc.stdout)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "no-such-model", "--layers", "0:1"], "no-such-model"),
        (["--model", "minilm", "--layers", "4:2"], "invalid layer range 4:2"),
        (["--model", "minilm", "--layers", "0:9"], "beyond model 'minilm'"),
    ],
)
def test_worker_config_errors(args: list[str], fragment: str) -> None:
    proc = Proc([*CLI, "worker", *args, "--listen", "127.0.0.1:0"])
    assert proc.wait(120) == 2
    assert fragment in "\n".join(proc.stderr)


def test_busy_port_is_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = Proc([*CLI, "worker", "--model", "minilm", "--layers", "0:6", "--listen", f"127.0.0.1:{port}"])
        assert proc.wait(120) == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is busy" in "\n".join(proc.stderr)
