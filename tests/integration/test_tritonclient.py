"""The official ``tritonclient[grpc]`` (sync and aio) against a real router + workers mesh, unchanged.

tritonclient needs protobuf < 7, and installing it beside the project downgrades protobuf so that the
project's generated code (gencode 7.x) no longer loads. So the client runs from its own virtual
environment, created on first use under the shardmesh cache (``$SHARDMESH_CACHE`` or
``~/.cache/shardmesh``)/tritonclient-venv, or the interpreter named by ``$SHARDMESH_TRITONCLIENT_PYTHON``.
Without network access to install it the tests skip, saying why. The client script prints each
output's raw bytes; the test checks them bit for bit against shardmesh.v1 Infer and the
single-process model (sentence-transformers).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc
from services.models.registry import default_cache_dir, resolve_model
from services.wire import codec
from tests.integration.test_oip import minilm_mesh_config
from tests.procs import UpMesh, mesh_up

pytestmark = [pytest.mark.integration]

TEXTS = ["Triton's client talks to the mesh.", "A second, longer sentence about routers and shard workers.", "Third."]
INSTALL_TIMEOUT_S = 900
CLIENT_TIMEOUT_S = 300

CLIENT_SCRIPT = textwrap.dedent(
    '''
    """Runs in tritonclient's own venv: calls the router and prints one JSON object."""
    import asyncio, base64, json, queue, sys

    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    url, texts, ids, mask = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    MODEL = "minilm"

    def b64(result):
        out = result.as_numpy("output")
        return {"shape": list(out.shape), "dtype": str(out.dtype), "b64": base64.b64encode(out.astype("<f4").tobytes()).decode()}

    def text_inputs(mod, batch):
        tensor = mod.InferInput("text", [len(batch)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in batch], dtype=np.object_))
        return [tensor]

    def id_inputs(mod):
        a = mod.InferInput("input_ids", [len(ids), len(ids[0])], "INT64")
        a.set_data_from_numpy(np.array(ids, dtype=np.int64))
        b = mod.InferInput("attention_mask", [len(mask), len(mask[0])], "INT64")
        b.set_data_from_numpy(np.array(mask, dtype=np.int64))
        return [a, b]

    report = {}
    client = grpcclient.InferenceServerClient(url=url)
    report["live"] = client.is_server_live()
    report["ready"] = client.is_server_ready()
    report["model_ready"] = client.is_model_ready(MODEL)
    report["server"] = client.get_server_metadata(as_json=True)
    report["metadata"] = client.get_model_metadata(MODEL, as_json=True)
    report["sync_batch"] = b64(client.infer(MODEL, text_inputs(grpcclient, texts), request_id="sync-1",
                                            outputs=[grpcclient.InferRequestedOutput("output")]))
    report["sync_single"] = [b64(client.infer(MODEL, text_inputs(grpcclient, [t]), priority=1, timeout=60_000_000)) for t in texts]
    report["sync_ids"] = b64(client.infer(MODEL, id_inputs(grpcclient)))
    relay = client.infer(MODEL, text_inputs(grpcclient, texts[:1]), parameters={"mode": "relay"})
    report["sync_relay"] = b64(relay)
    report["relay_params"] = {k: str(v).strip() for k, v in relay.get_response().parameters.items()}
    try:
        client.infer(MODEL, text_inputs(grpcclient, texts[:1]), parameters={"temperature": 0.5})
        report["sync_error"] = None
    except InferenceServerException as exc:
        report["sync_error"] = [exc.status(), exc.message()]

    # ModelStreamInfer: one at a time, so each answer is a solo forward
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    report["stream"] = []
    for i, text in enumerate(texts):
        client.async_stream_infer(MODEL, text_inputs(grpcclient, [text]), request_id=f"s{i}")
        result, error = answers.get(timeout=120)
        assert error is None, error
        report["stream"].append([result.get_response().id, b64(result)])
    client.async_stream_infer(MODEL, text_inputs(grpcclient, ["x"]), request_id="bad", parameters={"mode": "teleport"})
    result, error = answers.get(timeout=120)
    report["stream_error"] = None if error is None else error.message()
    client.async_stream_infer(MODEL, text_inputs(grpcclient, [texts[0]]), request_id="after")
    result, error = answers.get(timeout=120)
    report["stream_after_error"] = None if result is None else [result.get_response().id, b64(result)]
    client.stop_stream()
    client.close()

    async def aio_calls():
        async with aioclient.InferenceServerClient(url=url) as aclient:
            out = {"live": await aclient.is_server_live(), "model_ready": await aclient.is_model_ready(MODEL)}
            out["batch"] = b64(await aclient.infer(MODEL, text_inputs(aioclient, texts)))
            out["ids"] = b64(await aclient.infer(MODEL, id_inputs(aioclient)))

            async def requests():
                for i, text in enumerate(texts):
                    yield {"model_name": MODEL, "inputs": text_inputs(aioclient, [text]), "request_id": f"a{i}"}
                    await asyncio.sleep(0)

            out["stream"] = []
            async for result, error in aclient.stream_infer(inputs_iterator=requests()):
                assert error is None, error
                out["stream"].append([result.get_response().id, b64(result)])
                if len(out["stream"]) == len(texts):
                    break
            return out

    report["aio"] = asyncio.run(aio_calls())
    print(json.dumps(report))
    '''
)


def _venv_python() -> Path:
    """tritonclient's interpreter: $SHARDMESH_TRITONCLIENT_PYTHON, or a venv made once in the cache."""
    configured = os.environ.get("SHARDMESH_TRITONCLIENT_PYTHON")
    if configured:
        return Path(configured)
    venv = default_cache_dir() / "tritonclient-venv"
    python = venv / "bin" / "python"
    ready = venv / ".shardmesh-ready"
    if ready.is_file() and python.is_file():
        return python
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "tritonclient[grpc]", "numpy"],
        [str(python), "-c", "import tritonclient.grpc, tritonclient.grpc.aio"],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.skip(f"tritonclient[grpc] could not be installed in {venv} within {INSTALL_TIMEOUT_S}s (no network?)")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"tritonclient[grpc] could not be installed in {venv}: `{' '.join(step[-3:])}` failed: {last}")
    ready.write_text("tritonclient[grpc] numpy\n")
    return python


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return _venv_python()


@pytest.fixture(scope="module")
def mesh() -> Iterator[UpMesh]:
    with mesh_up(minilm_mesh_config()) as m:
        yield m


@pytest.fixture(scope="module")
def sentence_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")


def _tensor(entry: dict[str, object]) -> torch.Tensor:
    assert entry["dtype"] == "float32"
    data = np.frombuffer(base64.b64decode(str(entry["b64"])), dtype="<f4").reshape(entry["shape"])  # type: ignore[arg-type]
    return torch.from_numpy(data.copy())


def test_tritonclient_sync_and_aio_against_the_mesh(triton_python: Path, mesh: UpMesh, sentence_model) -> None:  # type: ignore[no-untyped-def]
    features = sentence_model.tokenize(TEXTS[:2])
    ids, mask = features["input_ids"].to(torch.int64), features["attention_mask"].to(torch.int64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # the venv's own packages only
    done = subprocess.run(
        [str(triton_python), "-c", CLIENT_SCRIPT, mesh.router, json.dumps(TEXTS), json.dumps(ids.tolist()), json.dumps(mask.tolist())],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server"]["name"] == "shardmesh"
    meta = report["metadata"]
    assert meta["name"] == "minilm" and meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["text", "input_ids", "attention_mask"]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "384"]}]

    with grpc.insecure_channel(mesh.router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        mesh_text = [codec.decode(stub.Infer(router_pb2.InferRequest(text=t), timeout=60).output) for t in TEXTS]
        mesh_ids = codec.decode(
            stub.Infer(router_pb2.InferRequest(tensor=codec.encode(ids), attention_mask=codec.encode(mask)), timeout=60).output
        )
    reference = [sentence_model.encode(t, convert_to_tensor=True) for t in TEXTS]
    with torch.no_grad():
        reference_ids = sentence_model({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]

    stacked = torch.cat(mesh_text)
    for name, got in (("sync batch", report["sync_batch"]), ("aio batch", report["aio"]["batch"])):
        out = _tensor(got)
        assert torch.equal(out, stacked), name
        assert torch.equal(out, torch.stack(reference)), name
    for i, entry in enumerate(report["sync_single"]):
        assert torch.equal(_tensor(entry), mesh_text[i]) and torch.equal(_tensor(entry)[0], reference[i])
    for name, got in (("sync ids", report["sync_ids"]), ("aio ids", report["aio"]["ids"])):
        assert torch.equal(_tensor(got), mesh_ids) and torch.equal(_tensor(got), reference_ids), name
    assert torch.equal(_tensor(report["sync_relay"]), mesh_text[0])
    assert "relay" in report["relay_params"]["shardmesh_mode"]

    status, message = report["sync_error"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameter 'temperature' is not supported" in message

    for prefix, stream in (("s", report["stream"]), ("a", report["aio"]["stream"])):
        assert sorted(rid for rid, _ in stream) == [f"{prefix}{i}" for i in range(len(TEXTS))]
        for rid, entry in stream:
            i = int(rid[1:])
            assert torch.equal(_tensor(entry), mesh_text[i]) and torch.equal(_tensor(entry)[0], reference[i]), rid
    assert report["stream_error"] and "parameter 'mode'" in report["stream_error"]
    rid, entry = report["stream_after_error"]
    assert rid == "after" and torch.equal(_tensor(entry), mesh_text[0])
