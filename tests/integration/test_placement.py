"""``shardmesh plan`` and ``up`` with ``layers: auto``, through the real CLI and real worker processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from services.client import RouterClient
from services.models.registry import resolve_model
from tests.procs import CLI, Proc, describe_all, mesh_up

pytestmark = [pytest.mark.integration]


def test_plan_cli_splits_by_capacity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDMESH_CACHE", str(tmp_path))
    proc = Proc([*CLI, "plan", "--model", "minilm", "--workers", "3", "--capacity", "4,1,1", "--json"])
    assert proc.wait(180) == 0, "\n".join(proc.stderr)
    result = json.loads("\n".join(proc.stdout))
    assert result["costs"] == "estimated" and result["layers"] == 6
    # 6 equal layers, speeds 4,1,1: 4 layers on the fast worker (4/4 = 1), one each on the others (1);
    # the even split's slow workers take 2 layers each (2): twice the throughput.
    stages = result["planned"]["groups"][0]
    assert [(s["worker"], s["layers"]) for s in stages] == [("w0", "0:4"), ("w1", "4:5"), ("w2", "5:6")]
    assert [s["layers"] for s in result["even"]["groups"][0]] == ["0:2", "2:4", "4:6"]
    assert result["throughput_ratio"] == pytest.approx(2.0)
    table = Proc([*CLI, "plan", "--model", "minilm", "--workers", "3", "--capacity", "4,1,1"])
    assert table.wait(180) == 0
    assert "planned / even predicted throughput: 2.00x" in table.stdout[-1]


def test_plan_cli_names_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDMESH_CACHE", str(tmp_path))
    proc = Proc([*CLI, "plan", "--model", "minilm", "--workers", "3", "--capacity", "1,2"])
    assert proc.wait(120) == 2
    assert "--capacity has 2 values for 3 workers" in "\n".join(proc.stderr)
    proc = Proc([*CLI, "plan", "--model", "minilm", "--workers", "2", "--memory-mb", "10,10"])
    assert proc.wait(120) == 2
    assert "do not fit" in "\n".join(proc.stderr)


def test_up_layers_auto_places_by_capacity_and_matches_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("SHARDMESH_CACHE", str(tmp_path))  # equal layers: the expected split is 0:4, 4:5, 5:6
    config = {"model": "minilm", "workers": [{"layers": "auto", "capacity": 4}, {"layers": "auto", "replicas": 2, "capacity": 1}]}
    with mesh_up(config) as mesh, RouterClient(mesh.router) as client:
        described = describe_all(mesh)
        spans = {name: (d.layers.start, d.layers.end) for name, d in described.items()}  # type: ignore[attr-defined]
        assert spans == {"w0": (0, 4), "w1r0": (4, 5), "w1r1": (5, 6)}
        assert {name: d.capacity.speed for name, d in described.items()} == {"w0": 4.0, "w1r0": 1.0, "w1r1": 1.0}  # type: ignore[attr-defined]
        assert any("placement: w0=0:4 w1r0=4:5 w1r1=5:6" in line for line in mesh.proc.stderr)
        text = "Placement follows capacity."
        result = client.infer(text=text)
        expected = SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu").encode(text, convert_to_tensor=True)
        assert torch.equal(result.output.reshape(expected.shape), expected)
        assert [h.layers.start for h in result.hops] == [0, 4, 5]


def test_up_rejects_mixed_auto(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "workers": [{"layers": "auto"}, {"layers": "3:6"}]}))
    proc = Proc([*CLI, "up", str(path)])
    assert proc.wait(60) == 2
    assert "layers: auto must be used by every worker or by none" in "\n".join(proc.stderr)
