"""Open Inference Protocol (KServe v2 gRPC + Triton's ModelStreamInfer) on the router, through raw gRPC
stubs generated from protos/inference: every method, errors, batches, raw vs typed contents, outputs
bit-identical to shardmesh.v1 Infer and to the single-process model (sentence-transformers).
Also gRPC reflection v1 beside v1alpha.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2

from router.oip import MeshWork, mesh_work, stack_outputs
from services.errors import InvalidArgument
from services.gen.inference import grpc_service_pb2 as oip_pb2
from services.gen.inference import grpc_service_pb2_grpc as oip_pb2_grpc
from services.gen.shardmesh.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.models.registry import resolve_model
from services.wire import codec
from tests.procs import UpMesh, mesh_up, start_router

TEXTS = ["The mesh speaks the serving ecosystem's protocol.", "Short.", "Triton clients call it unchanged."]


def _bytes_raw(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _text_request(texts: list[str], *, raw: bool, shape: list[int] | None = None, **kw: object) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name="minilm", **kw)  # type: ignore[arg-type]
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=shape or [len(texts)])
    encoded = [t.encode() for t in texts]
    if raw:
        request.raw_input_contents.append(_bytes_raw(encoded))
    else:
        tensor.contents.bytes_contents.extend(encoded)
    return request


def _ids_request(ids: torch.Tensor, mask: torch.Tensor | None, *, raw: bool) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name="minilm", model_version="1")
    for name, value in (("input_ids", ids), ("attention_mask", mask)):
        if value is None:
            continue
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(value.shape))
        if raw:
            request.raw_input_contents.append(value.numpy().astype("<i8").tobytes())
        else:
            tensor.contents.int64_contents.extend(value.reshape(-1).tolist())
    return request


def _output(reply: oip_pb2.ModelInferResponse) -> torch.Tensor:
    assert [o.name for o in reply.outputs] == ["output"] and reply.outputs[0].datatype == "FP32"
    assert len(reply.raw_output_contents) == 1 and not reply.outputs[0].HasField("contents")
    data = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(list(reply.outputs[0].shape))
    return torch.from_numpy(data.copy())


# --- pure translation (no processes) ------------------------------------------------------------------


def _work(request: oip_pb2.ModelInferRequest, stream: bool = False) -> MeshWork:
    return mesh_work(request, max_text_bytes=1 << 20, max_batch=8, stream=stream)


def _with(request: oip_pb2.ModelInferRequest, **params: object) -> oip_pb2.ModelInferRequest:
    for name, value in params.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


def test_text_batch_becomes_one_mesh_request_per_text_with_parameters() -> None:
    request = _with(_text_request(TEXTS, raw=True, id="r1"), priority=3, mode="relay", timeout=250_000)
    work = _work(request)
    assert [r.text for r in work.requests] == TEXTS and work.stacked
    assert all(r.priority == 3 and r.mode == tensor_pb2.MODE_RELAY for r in work.requests)
    assert work.timeout_s == pytest.approx(0.25)  # Triton's timeout is in microseconds
    assert len({r.request_id for r in work.requests}) == 3 and all("r1" in r.request_id for r in work.requests)
    # [batch, 1] is accepted too (Triton models often declare text that way); typed contents equal raw
    typed = _work(_text_request(TEXTS, raw=False, shape=[3, 1]))
    assert [r.text for r in typed.requests] == TEXTS
    # tritonclient sends priority as uint64_param
    request = _text_request(TEXTS[:1], raw=True)
    request.parameters["priority"].uint64_param = 7
    assert _work(request).requests[0].priority == 7 and not _work(request).stacked


def test_token_inputs_become_one_wire_tensor() -> None:
    ids = torch.tensor([[101, 7592, 102], [101, 2088, 102]])
    mask = torch.ones_like(ids)
    for raw in (True, False):
        (one,) = _work(_ids_request(ids, mask, raw=raw)).requests
        assert torch.equal(codec.decode(one.tensor), ids) and torch.equal(codec.decode(one.attention_mask), mask)


def _bad(**changes: object) -> oip_pb2.ModelInferRequest:
    return _with(_text_request(["hello"], raw=True), **changes)


def _ids_only(datatype: str = "INT64", shape: tuple[int, ...] = (1, 3), values: int = 3) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name="minilm")
    tensor = request.inputs.add(name="input_ids", datatype=datatype, shape=list(shape))
    tensor.contents.int64_contents.extend(range(1, values + 1))
    return request


def _mask_with(values: list[int]) -> oip_pb2.ModelInferRequest:
    request = _ids_only()
    tensor = request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 3])
    tensor.contents.int64_contents.extend(values)
    return request


def _text_and(name: str) -> oip_pb2.ModelInferRequest:
    request = _text_request(["hello"], raw=False)
    request.inputs.add(name=name, datatype="INT64", shape=[1, 1]).contents.int64_contents.append(1)
    return request


def _raw_and_contents() -> oip_pb2.ModelInferRequest:
    request = _text_request(["hello"], raw=True)
    request.inputs[0].contents.bytes_contents.append(b"hello")
    return request


def _requested(name: str) -> oip_pb2.ModelInferRequest:
    request = _text_request(["hello"], raw=True)
    request.outputs.add(name=name)
    return request


def _input(name: str, datatype: str, shape: list[int], **params: oip_pb2.InferParameter) -> oip_pb2.ModelInferRequest.InferInputTensor:
    return oip_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape, parameters=params)


def _req(inputs: list[oip_pb2.ModelInferRequest.InferInputTensor], raw: list[bytes] | None = None) -> oip_pb2.ModelInferRequest:
    return oip_pb2.ModelInferRequest(model_name="minilm", inputs=inputs, raw_input_contents=raw or [])


def _with_raw(request: oip_pb2.ModelInferRequest, raw: bytes) -> oip_pb2.ModelInferRequest:
    del request.raw_input_contents[:]
    request.raw_input_contents.append(raw)
    return request


BAD_REQUESTS = {
    "unknown input": (lambda: _text_and("pixels"), "input 'pixels' is not an input"),
    "text with mask": (lambda: _text_and("attention_mask"), "input 'text' cannot be sent with 'attention_mask'"),
    "text with ids": (lambda: _text_and("input_ids"), "input 'text' cannot be sent with 'input_ids'"),
    "no input": (lambda: oip_pb2.ModelInferRequest(model_name="minilm"), "no input"),
    "mask alone": (lambda: _req([_mask_with([1, 1, 1]).inputs[1]]), "input 'attention_mask' needs 'input_ids'"),
    "text datatype": (lambda: _req([_input("text", "INT64", [1])]), "input 'text': datatype INT64; expected BYTES"),
    "text shape": (lambda: _text_request(["a", "b"], raw=True, shape=[1, 2]), "input 'text': shape [1, 2]"),
    "text count": (lambda: _text_request(["a", "b"], raw=True, shape=[3]), "raw contents hold 2 BYTES elements, its shape needs 3"),
    "truncated prefix": (lambda: _with_raw(_text_request(["a"], raw=True), b"\x05\x00"), "4-byte length prefix"),
    "truncated element": (lambda: _with_raw(_text_request(["a"], raw=True), struct.pack("<I", 9) + b"abc"), "declares 9 bytes"),
    "bad utf-8": (lambda: _with_raw(_text_request(["a"], raw=True), _bytes_raw([b"\xff\xfe"])), "element 0 is not valid UTF-8"),
    "blank text": (lambda: _text_request(["   "], raw=True), "input 'text': element 0 is empty"),
    "raw and contents": (_raw_and_contents, "not both"),
    "raw count": (lambda: _req([_input("input_ids", "INT64", [1, 1])], [b"\0" * 8] * 2), "raw_input_contents has 2 entries for 1 inputs"),
    "ids datatype": (lambda: _ids_only(datatype="INT32"), "input 'input_ids': datatype INT32; expected INT64"),
    "ids rank": (lambda: _ids_only(shape=(3,)), "input 'input_ids': shape [3]; expected [batch, seq]"),
    "ids count": (lambda: _ids_only(values=2), "int64_contents has 2 elements, shape [1, 3] needs 3"),
    "ids raw size": (lambda: _req([_input("input_ids", "INT64", [1, 2])], [b"\0" * 12]), "raw contents are 12 bytes, shape [1, 2] of INT64 needs 16"),
    "mask values": (lambda: _mask_with([1, 2, 0]), "input 'attention_mask': values must be 0 or 1"),
    "unknown parameter": (lambda: _bad(temperature=0.5), "parameter 'temperature' is not supported"),
    "sequence": (lambda: _bad(sequence_id=4), "parameter 'sequence_id': sequence batching is not supported"),
    "session": (lambda: _bad(session="s1"), "parameter 'session'"),
    "bad mode": (lambda: _bad(mode="teleport"), "parameter 'mode': 'teleport' is not one of direct, relay"),
    "priority type": (lambda: _bad(priority="high"), "parameter 'priority': expected an integer"),
    "priority range": (lambda: _bad(priority=2**33), "parameter 'priority': 8589934592 is out of range"),
    "final flag on unary": (lambda: _bad(triton_enable_empty_final_response=True), "triton_enable_empty_final_response' is not supported"),
    "unknown output": (lambda: _requested("logits"), "requested output 'logits' does not exist"),
    "input parameters": (
        lambda: _req([_input("text", "BYTES", [1], shared_memory_region=oip_pb2.InferParameter(string_param="r"))]),
        "input 'text': input parameters (shared_memory_region) are not supported",
    ),
    "batch limit": (lambda: _text_request(["x"] * 9, raw=True), "a batch of 9 texts exceeds the router's limit of 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_naming_what_to_fix(case: str) -> None:
    factory, fragment = BAD_REQUESTS[case]
    with pytest.raises(InvalidArgument) as info:
        _work(factory())
    assert fragment in str(info.value)


def test_stream_accepts_the_final_response_flag() -> None:
    assert _work(_bad(triton_enable_empty_final_response=True), stream=True).final_response_flag


def test_outputs_of_different_token_lengths_are_not_stacked() -> None:
    def reply(shape: list[int]) -> router_pb2.InferResponse:
        return router_pb2.InferResponse(output=codec.encode(torch.zeros(shape)))

    stacked = stack_outputs([reply([1, 4]), reply([1, 4])])
    assert list(stacked.shape) == [2, 4] and len(stacked.data) == 2 * 4 * 4
    with pytest.raises(InvalidArgument, match="input 'text': element 1 gives an output of shape \\[1, 5, 8\\]"):
        stack_outputs([reply([1, 3, 8]), reply([1, 5, 8])])


# --- a real mesh ------------------------------------------------------------------------------------


def solo_worker_args() -> list[str]:
    """Worker flags for bit-identical outputs: dynamic batching (where the worker has it) runs concurrent
    requests in one forward, which changes float rounding; --max-batch-size 1 turns it off."""
    from services.cli.parser import build_parser

    argv = ["worker", "--model", "minilm", "--layers", "0:1", "--listen", "127.0.0.1:0", "--max-batch-size", "1"]
    try:
        build_parser().parse_args(argv)
    except SystemExit:  # a worker without dynamic batching: every forward is solo already
        return []
    return ["--max-batch-size", "1"]


def minilm_mesh_config() -> dict[str, object]:
    return {"model": "minilm", "workers": [{"layers": "0:3"}, {"layers": "3:6"}], "worker_args": solo_worker_args()}


@pytest.fixture(scope="module")
def mesh() -> Iterator[UpMesh]:
    with mesh_up(minilm_mesh_config()) as m:
        yield m


@pytest.fixture(scope="module")
def channel(mesh: UpMesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mesh.router) as ch:
        yield ch


@pytest.fixture(scope="module")
def oip(channel: grpc.Channel) -> oip_pb2_grpc.GRPCInferenceServiceStub:
    return oip_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def sentence_model():  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model("minilm").model_dir), device="cpu")


def _shardmesh_infer(channel: grpc.Channel, request: router_pb2.InferRequest) -> torch.Tensor:
    return codec.decode(router_pb2_grpc.RouterStub(channel).Infer(request, timeout=60).output)


@pytest.mark.integration
def test_health_and_metadata_methods(oip: oip_pb2_grpc.GRPCInferenceServiceStub) -> None:
    assert oip.ServerLive(oip_pb2.ServerLiveRequest(), timeout=10).live
    assert oip.ServerReady(oip_pb2.ServerReadyRequest(), timeout=10).ready
    for version in ("", "1"):
        assert oip.ModelReady(oip_pb2.ModelReadyRequest(name="minilm", version=version), timeout=10).ready
    server = oip.ServerMetadata(oip_pb2.ServerMetadataRequest(), timeout=10)
    assert server.name == "shardmesh" and server.version and "parameters" in server.extensions
    meta = oip.ModelMetadata(oip_pb2.ModelMetadataRequest(name="minilm"), timeout=10)
    assert meta.name == "minilm" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text", "BYTES", [-1]), ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 384])]
    for call in (
        lambda: oip.ModelReady(oip_pb2.ModelReadyRequest(name="bert-large"), timeout=10),
        lambda: oip.ModelMetadata(oip_pb2.ModelMetadataRequest(name="minilm", version="2"), timeout=10),
        lambda: oip.ModelInfer(oip_pb2.ModelInferRequest(model_name="gpt"), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        assert "it serves 'minilm'" in info.value.details() or "use '' or '1'" in info.value.details()


@pytest.mark.integration
def test_text_batch_raw_and_contents_equal_shardmesh_and_reference(
    oip: oip_pb2_grpc.GRPCInferenceServiceStub, channel: grpc.Channel, sentence_model  # type: ignore[no-untyped-def]
) -> None:
    raw = oip.ModelInfer(_text_request(TEXTS, raw=True, id="batch-1"), timeout=120)
    typed = oip.ModelInfer(_text_request(TEXTS, raw=False, shape=[3, 1]), timeout=120)
    assert raw.id == "batch-1" and raw.model_name == "minilm" and raw.model_version == "1"
    assert list(raw.outputs[0].shape) == [3, 384]
    assert raw.raw_output_contents[0] == typed.raw_output_contents[0]
    assert raw.parameters["shardmesh_mode"].string_param == "direct"
    assert raw.parameters["shardmesh_route"].string_param.count(";") == 2
    out = _output(raw)
    for i, text in enumerate(TEXTS):
        mesh_out = _shardmesh_infer(channel, router_pb2.InferRequest(text=text))
        assert torch.equal(out[i : i + 1], mesh_out), text
        expected = sentence_model.encode(text, convert_to_tensor=True)
        assert torch.equal(out[i], expected), text


@pytest.mark.integration
def test_token_batch_raw_and_contents_equal_shardmesh_and_reference(
    oip: oip_pb2_grpc.GRPCInferenceServiceStub, channel: grpc.Channel, sentence_model  # type: ignore[no-untyped-def]
) -> None:
    features = sentence_model.tokenize(TEXTS[:2])  # padded batch [2, seq] with its mask
    ids, mask = features["input_ids"].to(torch.int64), features["attention_mask"].to(torch.int64)
    raw = oip.ModelInfer(_ids_request(ids, mask, raw=True), timeout=120)
    typed = oip.ModelInfer(_ids_request(ids, mask, raw=False), timeout=120)
    assert raw.raw_output_contents[0] == typed.raw_output_contents[0]
    out = _output(raw)
    assert list(out.shape) == [2, 384]
    mesh_out = _shardmesh_infer(
        channel, router_pb2.InferRequest(tensor=codec.encode(ids), attention_mask=codec.encode(mask))
    )
    assert torch.equal(out, mesh_out)
    with torch.no_grad():
        expected = sentence_model({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
    assert torch.equal(out, expected)


@pytest.mark.integration
def test_parameters_reach_the_mesh(oip: oip_pb2_grpc.GRPCInferenceServiceStub, channel: grpc.Channel) -> None:
    relay = oip.ModelInfer(_with(_text_request(TEXTS[:1], raw=True), mode="relay", priority=1), timeout=60)
    assert relay.parameters["shardmesh_mode"].string_param == "relay"
    direct = _shardmesh_infer(channel, router_pb2.InferRequest(text=TEXTS[0]))
    assert torch.equal(_output(relay), direct)
    with pytest.raises(grpc.RpcError) as info:  # 1 microsecond: gone before the first hop answers
        oip.ModelInfer(_with(_text_request(TEXTS[:1], raw=True), timeout=1), timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # the priority reaches the router's scheduler (levels 1..3)
        oip.ModelInfer(_with(_text_request(TEXTS[:1], raw=True), priority=9), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority: 9 is out of range" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # so does x-shardmesh-priority metadata, as on shardmesh.v1
        oip.ModelInfer(_text_request(TEXTS[:1], raw=True), timeout=60, metadata=(("x-shardmesh-priority", "7"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-shardmesh-priority" in info.value.details()


@pytest.mark.integration
def test_bad_requests_over_grpc_and_the_router_keeps_serving(oip: oip_pb2_grpc.GRPCInferenceServiceStub, channel: grpc.Channel) -> None:
    for case in ("mask values", "unknown input", "bad utf-8", "unknown parameter"):
        with pytest.raises(grpc.RpcError) as info:
            oip.ModelInfer(BAD_REQUESTS[case][0](), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and BAD_REQUESTS[case][1] in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # not a protobuf message at all
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\x00garbage", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(oip.ModelInfer(_text_request(["still serving"], raw=True), timeout=60).outputs[0].shape) == [1, 384]


@pytest.mark.integration
def test_stream_answers_each_request_and_errors_in_band(oip: oip_pb2_grpc.GRPCInferenceServiceStub, channel: grpc.Channel) -> None:
    requests = [
        _text_request(TEXTS[:1], raw=True, id="a"),
        _with(_text_request(["x"], raw=True, id="bad"), mode="teleport"),
        _with(_text_request(TEXTS[1:3], raw=False, id="b"), triton_enable_empty_final_response=True),
        _text_request(TEXTS[:1], raw=True, id="a"),  # ids may repeat on an OIP stream
    ]
    replies = list(oip.ModelStreamInfer(iter(requests), timeout=120))
    assert len(replies) == 4
    errors = [r for r in replies if r.error_message]
    assert len(errors) == 1 and errors[0].infer_response.id == "bad"
    assert "INVALID_ARGUMENT" in errors[0].error_message and "parameter 'mode'" in errors[0].error_message
    good = {}
    for reply in replies:
        if not reply.error_message:
            good.setdefault(reply.infer_response.id, []).append(reply.infer_response)
    assert sorted((k, len(v)) for k, v in good.items()) == [("a", 2), ("b", 1)]
    assert good["b"][0].parameters["triton_final_response"].bool_param
    assert "triton_final_response" not in good["a"][0].parameters
    for text, out in ((TEXTS[0], _output(good["a"][0])), (TEXTS[1], _output(good["b"][0])[0:1])):
        assert torch.equal(out, _shardmesh_infer(channel, router_pb2.InferRequest(text=text)))
    # a message that does not parse is answered in-band and the stream goes on
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    answers = list(call(iter([b"\xff\x00garbage", _text_request(TEXTS[:1], raw=True, id="z").SerializeToString()]), timeout=120))
    parsed = [oip_pb2.ModelStreamInferResponse.FromString(a) for a in answers]
    assert len(parsed) == 2 and "INVALID_ARGUMENT" in parsed[0].error_message and parsed[1].infer_response.id == "z"


def _reflect(channel: grpc.Channel, version: str, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    """v1 and v1alpha messages are wire-identical; the path picks the protocol version."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (reply,) = list(call(iter([request]), timeout=10))
    return reply


@pytest.mark.integration
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_oip(channel: grpc.Channel, version: str) -> None:
    listed = _reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"shardmesh.v1.Router", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    for symbol in ("inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection"):
        described = _reflect(channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        assert not described.HasField("error_response"), described.error_response
        assert described.file_descriptor_response.file_descriptor_proto


@pytest.mark.integration
def test_not_ready_without_a_complete_route() -> None:
    router, address = start_router(["127.0.0.1:9"], "--model", "minilm")  # nothing listens on the discard port
    try:
        with grpc.insecure_channel(address) as ch:
            stub = oip_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=10).ready
            assert not stub.ModelReady(oip_pb2.ModelReadyRequest(name="minilm"), timeout=10).ready
    finally:
        assert router.stop() == 0


@pytest.mark.integration
def test_oip_methods_sit_under_client_auth(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """OIP methods need credentials like shardmesh.v1 ones, tenants' method lists may name them, and
    reflection (v1 and v1alpha) stays open."""
    import secrets

    import yaml

    token = "oip-" + secrets.token_hex(16)
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump({"tokens": {token: "probe"}, "tenants": {"probe": {"methods": ["ModelReady", "ServerLive"]}}}))
    router, address = start_router(["127.0.0.1:9"], "--model", "minilm", "--auth-tokens-file", str(tokens_file))
    try:
        with grpc.insecure_channel(address) as ch:
            stub = oip_pb2_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = (("authorization", f"Bearer {token}"),)
            assert stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=10, metadata=auth).live
            assert not stub.ModelReady(oip_pb2.ModelReadyRequest(name="minilm"), timeout=10, metadata=auth).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_text_request(["hello"], raw=True), timeout=10, metadata=auth)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "may not call ModelInfer" in info.value.details()
            for version in ("v1", "v1alpha"):  # no credentials needed
                listed = _reflect(ch, version, reflection_pb2.ServerReflectionRequest(list_services=""))
                assert "inference.GRPCInferenceService" in {s.name for s in listed.list_services_response.service}
    finally:
        assert router.stop() == 0
