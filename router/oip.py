"""The Open Inference Protocol (KServe v2 gRPC) and Triton's ModelStreamInfer on the router's port.

Clients that already speak to Triton or KServe (tritonclient, KServe's SDK) call the mesh unchanged:
``inference.GRPCInferenceService`` is a translation layer around :meth:`RouterCore.infer`, so every
OIP request takes the same path as a ``shardmesh.v1.Router/Infer`` call (admission, planning,
failover, hedging) and returns the same output tensor, byte for byte.

The model name is the mesh's model (the id its workers describe, e.g. ``minilm``); version ``""`` or
``"1"``. Inputs: ``text`` (BYTES ``[batch]`` or ``[batch, 1]``; each text is one mesh request, run
concurrently, outputs stacked on the batch dimension), or ``input_ids`` with an optional
``attention_mask`` (INT64 ``[batch, seq]``, one mesh request). Output ``output`` as the mesh returns
it (FP32), in ``raw_output_contents`` as Triton answers. Request parameters: ``priority``,
``timeout`` (microseconds, Triton's unit) and ``mode`` (``direct``/``relay``). The parsing half of
this module is pure (no I/O), so every malformed request is refused before any work, naming the
input or parameter to fix.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from services import tracing
from services.errors import InvalidArgument, NotFound, ShardmeshError, grpc_errors, status_of
from services.gen.inference import grpc_service_pb2 as oip_pb2
from services.gen.inference import grpc_service_pb2_grpc as oip_pb2_grpc
from services.gen.shardmesh.v1 import router_pb2, tensor_pb2
from services.security.client_auth import ANONYMOUS, CURRENT_TENANT
from services.transport.raw import add_parsing_servicer, parser
from services.transport.stream_server import StreamHandlers, serve_multiplexed
from router.core import MODE_NAMES, RouterCore
from router.inputs import check_text_size
from router.scheduling import CallerInfo

OIP_SERVICE_NAME = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OIP_METHODS = tuple(m.name for m in oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)
MODEL_VERSION = "1"
SERVER_NAME = "shardmesh"
PLATFORM = "shardmesh_pytorch"
EXTENSIONS = ("parameters", "model_stream_infer")
TEXT, INPUT_IDS, ATTENTION_MASK, OUTPUT = "text", "input_ids", "attention_mask", "output"
MICROSECONDS = 1_000_000
MAX_PRIORITY = 2**32 - 1
_BYTES_PREFIX = struct.Struct("<I")

# shardmesh wire dtype -> OIP datatype of the output.
OIP_DATATYPE = {
    tensor_pb2.DTYPE_FLOAT32: "FP32",
    tensor_pb2.DTYPE_FLOAT16: "FP16",
    tensor_pb2.DTYPE_BFLOAT16: "BF16",
    tensor_pb2.DTYPE_FLOAT64: "FP64",
    tensor_pb2.DTYPE_INT64: "INT64",
    tensor_pb2.DTYPE_INT32: "INT32",
    tensor_pb2.DTYPE_BOOL: "BOOL",
    tensor_pb2.DTYPE_UINT8: "UINT8",
}
_PARAMETERS = ("priority", "timeout", "mode")
_STREAM_PARAMETERS = ("triton_enable_empty_final_response",)
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


# ---------------------------------------------------------------------------------------------------
# Pure translation: OIP request -> mesh requests, mesh responses -> OIP response.


@dataclass
class MeshWork:
    """What one OIP request asks of the mesh: one InferRequest per text, or one for a token batch."""

    requests: list[router_pb2.InferRequest]
    timeout_s: float | None = None  # the request's own `timeout` parameter
    stacked: bool = False  # several texts: outputs are stacked on the batch dimension
    final_response_flag: bool = False  # Triton's triton_enable_empty_final_response (streams)
    parameters: dict[str, Any] = field(default_factory=dict)


def _param_value(name: str, param: oip_pb2.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgument(f"parameter {name!r}: no value set")
    return getattr(param, kind)


def _int_param(name: str, param: oip_pb2.InferParameter, low: int, high: int) -> int:
    value = _param_value(name, param)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"parameter {name!r}: expected an integer (int64_param or uint64_param), got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"parameter {name!r}: {value} is out of range [{low}, {high}]")
    return value


def parse_parameters(params: Any, *, stream: bool) -> dict[str, Any]:
    """Request-level parameters the mesh honours; anything else is INVALID_ARGUMENT naming it."""
    allowed = _PARAMETERS + (_STREAM_PARAMETERS if stream else ())
    parsed: dict[str, Any] = {}
    for name in sorted(params):
        param = params[name]
        if name in _SEQUENCE_PARAMETERS:
            raise InvalidArgument(
                f"parameter {name!r}: sequence batching is not supported (the mesh's models are stateless per "
                "request); send requests without sequence_id"
            )
        if name == "priority":
            parsed[name] = _int_param(name, param, 0, MAX_PRIORITY)
        elif name == "timeout":
            parsed[name] = _int_param(name, param, 0, 2**63 - 1) / MICROSECONDS
        elif name == "mode":
            value = _param_value(name, param)
            if value not in MODE_NAMES:
                raise InvalidArgument(f"parameter 'mode': {value!r} is not one of {', '.join(sorted(MODE_NAMES))}")
            parsed[name] = MODE_NAMES[value]
        elif name in allowed:
            value = _param_value(name, param)
            if not isinstance(value, bool):
                raise InvalidArgument(f"parameter {name!r}: expected bool_param, got {value!r}")
            parsed[name] = value
        elif name == "session":
            raise InvalidArgument(
                "parameter 'session': ModelInfer runs no session (sessions belong to shardmesh.v1 Generate); "
                "remove it"
            )
        else:
            raise InvalidArgument(f"parameter {name!r} is not supported; the router accepts: {', '.join(allowed)}")
    return parsed


def _element_count(name: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count *= dim
    return count


def _split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """BYTES raw contents: each element is a 4-byte little-endian length and that many bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: raw BYTES contents end inside an element's 4-byte length prefix")
        (size,) = _BYTES_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument(
                f"input {name!r}: raw BYTES element {len(items)} declares {size} bytes but only "
                f"{len(raw) - offset} remain"
            )
        items.append(raw[offset : offset + size])
        offset += size
    if len(items) != count:
        raise InvalidArgument(f"input {name!r}: raw contents hold {len(items)} BYTES elements, its shape needs {count}")
    return items


def _texts(tensor: Any, raw: bytes | None) -> list[str]:
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input 'text': datatype {tensor.datatype or '(empty)'}; expected BYTES")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidArgument(f"input 'text': shape {shape}; expected [batch] or [batch, 1] with batch >= 1")
    count = _element_count(TEXT, shape)
    if raw is not None:
        items = _split_bytes(TEXT, raw, count)
    else:
        items = list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise InvalidArgument(
                f"input 'text': contents.bytes_contents has {len(items)} elements, shape {shape} needs {count}"
            )
    texts: list[str] = []
    for i, item in enumerate(items):
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"input 'text': element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            raise InvalidArgument(f"input 'text': element {i} is empty; send at least one non-blank character")
        texts.append(text)
    return texts


def _int64_tensor(tensor: Any, raw: bytes | None) -> tensor_pb2.Tensor:
    """An INT64 [batch, seq] input as a shardmesh wire tensor (little-endian bytes, no copy for raw)."""
    name = tensor.name
    if tensor.datatype != "INT64":
        raise InvalidArgument(f"input {name!r}: datatype {tensor.datatype or '(empty)'}; expected INT64")
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise InvalidArgument(f"input {name!r}: shape {shape}; expected [batch, seq] with both >= 1")
    count = _element_count(name, shape)
    if raw is not None:
        if len(raw) != count * 8:
            raise InvalidArgument(
                f"input {name!r}: raw contents are {len(raw)} bytes, shape {shape} of INT64 needs {count * 8}"
            )
        data = raw
    else:
        values = tensor.contents.int64_contents
        if len(values) != count:
            raise InvalidArgument(
                f"input {name!r}: contents.int64_contents has {len(values)} elements, shape {shape} needs {count}"
            )
        data = np.asarray(values, dtype="<i8").tobytes()
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=shape, data=data)


def _check_contents_kind(tensor: Any, raw_used: bool) -> None:
    if raw_used and tensor.HasField("contents"):
        raise InvalidArgument(
            f"input {tensor.name!r}: set either raw_input_contents or contents for every input, not both"
        )
    if tensor.parameters:
        names = ", ".join(sorted(tensor.parameters))
        raise InvalidArgument(
            f"input {tensor.name!r}: input parameters ({names}) are not supported (no shared-memory inputs); "
            "send the data in contents or raw_input_contents"
        )


def mesh_work(request: oip_pb2.ModelInferRequest, *, max_text_bytes: int, max_batch: int, stream: bool = False) -> MeshWork:
    """Validates an OIP request and turns it into shardmesh InferRequests (raises InvalidArgument)."""
    params = parse_parameters(request.parameters, stream=stream)
    for wanted in request.outputs:
        if wanted.name != OUTPUT:
            raise InvalidArgument(f"requested output {wanted.name!r} does not exist; the model's only output is 'output'")
        if wanted.parameters:
            raise InvalidArgument(
                f"requested output 'output': parameters ({', '.join(sorted(wanted.parameters))}) are not supported"
            )
    raw_used = len(request.raw_input_contents) > 0
    if raw_used and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs; "
            "send one entry per input, in the order of inputs"
        )
    by_name: dict[str, tuple[Any, bytes | None]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in (TEXT, INPUT_IDS, ATTENTION_MASK):
            raise InvalidArgument(
                f"input {tensor.name!r} is not an input of this model; send 'text' (BYTES) or "
                "'input_ids' (INT64) with an optional 'attention_mask' (INT64)"
            )
        if tensor.name in by_name:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        _check_contents_kind(tensor, raw_used)
        by_name[tensor.name] = (tensor, request.raw_input_contents[index] if raw_used else None)
    base = router_pb2.InferRequest(priority=params.get("priority", 0), mode=params.get("mode", 0))
    tag = request.id or uuid.uuid4().hex[:12]
    work = MeshWork(
        requests=[],
        timeout_s=params.get("timeout") or None,
        final_response_flag=bool(params.get("triton_enable_empty_final_response", False)),
        parameters=params,
    )
    if TEXT in by_name:
        if INPUT_IDS in by_name or ATTENTION_MASK in by_name:
            extra = INPUT_IDS if INPUT_IDS in by_name else ATTENTION_MASK
            raise InvalidArgument(f"input 'text' cannot be sent with {extra!r}: send either text or input_ids (+ attention_mask)")
        texts = _texts(*by_name[TEXT])
        if len(texts) > max_batch:
            raise InvalidArgument(
                f"input 'text': a batch of {len(texts)} texts exceeds the router's limit of {max_batch} "
                "(--max-inflight); split the batch"
            )
        for i, text in enumerate(texts):
            check_text_size(text, max_text_bytes, field=f"input 'text' element {i}")
            one = router_pb2.InferRequest()
            one.CopyFrom(base)
            one.text = text
            one.request_id = f"oip-{tag}-{i}-{uuid.uuid4().hex[:8]}"
            work.requests.append(one)
        work.stacked = len(texts) > 1
        return work
    if INPUT_IDS not in by_name:
        if ATTENTION_MASK in by_name:
            raise InvalidArgument("input 'attention_mask' needs 'input_ids'; send input_ids too, or text instead")
        raise InvalidArgument("no input: send 'text' (BYTES) or 'input_ids' (INT64 [batch, seq])")
    one = router_pb2.InferRequest()
    one.CopyFrom(base)
    one.request_id = f"oip-{tag}-{uuid.uuid4().hex[:8]}"
    one.tensor.CopyFrom(_int64_tensor(*by_name[INPUT_IDS]))
    if ATTENTION_MASK in by_name:
        mask = _int64_tensor(*by_name[ATTENTION_MASK])
        if list(mask.shape) != list(one.tensor.shape):
            raise InvalidArgument(
                f"input 'attention_mask': shape {list(mask.shape)} does not match input_ids' {list(one.tensor.shape)}"
            )
        values = np.frombuffer(mask.data, dtype="<i8")
        if values.size and not np.isin(values, (0, 1)).all():
            raise InvalidArgument("input 'attention_mask': values must be 0 or 1")
        one.attention_mask.CopyFrom(mask)
    work.requests.append(one)
    return work


def stack_outputs(responses: Sequence[router_pb2.InferResponse]) -> tensor_pb2.Tensor:
    """Outputs of one-text requests (leading dimension 1) as one tensor, stacked on the batch dimension."""
    first = responses[0].output
    if len(responses) == 1:
        return first
    for i, response in enumerate(responses):
        out = response.output
        if out.dtype != first.dtype or not out.shape or out.shape[0] != 1 or list(out.shape[1:]) != list(first.shape[1:]):
            raise InvalidArgument(
                f"input 'text': element {i} gives an output of shape {list(out.shape)}, element 0 one of "
                f"{list(first.shape)}; outputs with a per-token dimension cannot be stacked when texts tokenise "
                "to different lengths: send one text per request, or input_ids with attention_mask"
            )
    return tensor_pb2.Tensor(
        dtype=first.dtype,
        shape=[len(responses), *first.shape[1:]],
        data=b"".join(r.output.data for r in responses),
    )


def infer_response(
    request: oip_pb2.ModelInferRequest, model_name: str, responses: Sequence[router_pb2.InferResponse]
) -> oip_pb2.ModelInferResponse:
    """The OIP answer: ``output`` in raw_output_contents (little-endian, as Triton answers), plus what the
    mesh did (route, attempts, mode, time) as response parameters."""
    output = stack_outputs(responses)
    reply = oip_pb2.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request.id)
    reply.outputs.add(name=OUTPUT, datatype=OIP_DATATYPE.get(output.dtype, "FP32"), shape=list(output.shape))
    reply.raw_output_contents.append(output.data)
    reply.parameters["shardmesh_route"].string_param = ";".join(",".join(r.route) for r in responses)
    reply.parameters["shardmesh_attempts"].int64_param = max(r.attempts for r in responses)
    reply.parameters["shardmesh_mode"].string_param = tensor_pb2.Mode.Name(responses[0].mode).removeprefix("MODE_").lower()
    reply.parameters["shardmesh_total_ms"].double_param = max(r.total_ms for r in responses)
    return reply


# ---------------------------------------------------------------------------------------------------
# The servicer.


async def _all_or_nothing(calls: list[Any]) -> list[Any]:
    """Runs the calls concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _caller(context: grpc.aio.ServicerContext) -> CallerInfo:
    """Priority and tenant metadata for the scheduler; the tenant client auth named wins over metadata."""
    tenant = CURRENT_TENANT.get()
    return CallerInfo.from_metadata(context.invocation_metadata(), tenant if tenant != ANONYMOUS else None)


@dataclass
class _StreamItem:
    """One ModelStreamInfer request; OIP ids are optional and may repeat, so the stream keys on a counter."""

    request_id: str
    message: oip_pb2.ModelInferRequest


class OipServicer(oip_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        core: RouterCore,
        *,
        configured_model: str | None,
        max_text_bytes: int,
        max_stream_pending: int,
        charge_stream_request: Callable[[], None] | None = None,
    ) -> None:
        self._core = core
        self._configured_model = configured_model  # --model: the name before any worker described itself
        self._max_text_bytes = max_text_bytes
        self._max_stream_pending = max_stream_pending
        self._charge_stream_request = charge_stream_request
        self._stream_seq = 0

    # -- model identity -----------------------------------------------------------------------------

    def _route_model(self) -> str | None:
        """The model of the complete route, or None when there is none."""
        try:
            return self._core.topology.plan().model_id
        except ShardmeshError:
            return None

    def model_names(self) -> set[str]:
        names = {w.model_id for w in self._core.topology.workers}
        if self._configured_model:
            names.add(self._configured_model)
        return names

    def _check_model(self, name: str, version: str) -> str:
        names = self.model_names()
        if name not in names:
            served = ", ".join(repr(n) for n in sorted(names)) or "none yet (no worker has described itself)"
            raise NotFound(f"model {name!r} is not served by this router; it serves {served}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; use '' or '1'")
        return name

    # -- health and metadata ------------------------------------------------------------------------

    @grpc_errors
    async def ServerLive(self, request: oip_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext) -> oip_pb2.ServerLiveResponse:
        return oip_pb2.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: oip_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext) -> oip_pb2.ServerReadyResponse:
        return oip_pb2.ServerReadyResponse(ready=self._route_model() is not None)

    @grpc_errors
    async def ModelReady(self, request: oip_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext) -> oip_pb2.ModelReadyResponse:
        name = self._check_model(request.name, request.version)
        route_model = self._route_model()
        return oip_pb2.ModelReadyResponse(ready=route_model is not None and route_model in (name, self._configured_model))

    @grpc_errors
    async def ServerMetadata(
        self, request: oip_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ServerMetadataResponse:
        try:
            version = metadata.version("shardmesh")
        except metadata.PackageNotFoundError:
            version = "0"
        return oip_pb2.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=list(EXTENSIONS))

    @grpc_errors
    async def ModelMetadata(
        self, request: oip_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ModelMetadataResponse:
        name = self._check_model(request.name, request.version)
        reply = oip_pb2.ModelMetadataResponse(name=name, versions=[MODEL_VERSION], platform=PLATFORM)
        reply.inputs.add(name=TEXT, datatype="BYTES", shape=[-1])
        reply.inputs.add(name=INPUT_IDS, datatype="INT64", shape=[-1, -1])
        reply.inputs.add(name=ATTENTION_MASK, datatype="INT64", shape=[-1, -1])
        reply.outputs.add(name=OUTPUT, datatype="FP32", shape=self._output_shape(name))
        return reply

    def _output_shape(self, name: str) -> list[int]:
        """Sentence encoders (bert) give one vector per input, causal LMs logits per token."""
        for worker in self._core.topology.workers:
            if worker.model_id == name or self._configured_model == name:
                if worker.architecture == "bert":
                    return [-1, worker.hidden_size or -1]
                return [-1, -1, -1]
        return [-1, -1]

    # -- inference ----------------------------------------------------------------------------------

    async def _infer(
        self, request: oip_pb2.ModelInferRequest, time_remaining: float | None, caller: CallerInfo, *, stream: bool,
        traceparent: str = "",
    ) -> tuple[oip_pb2.ModelInferResponse, MeshWork]:
        """``traceparent``: the client's W3C trace context; each batch row's span (RouterCore.infer) continues it."""
        name = self._check_model(request.model_name, request.model_version)
        work = mesh_work(request, max_text_bytes=self._max_text_bytes, max_batch=self._core.max_inflight, stream=stream)
        if work.timeout_s is not None:
            time_remaining = work.timeout_s if time_remaining is None else min(time_remaining, work.timeout_s)
        responses = await _all_or_nothing(
            [self._core.infer(r, time_remaining, caller, traceparent=traceparent) for r in work.requests]
        )
        return infer_response(request, name, responses), work

    @grpc_errors
    async def ModelInfer(self, request: oip_pb2.ModelInferRequest, context: grpc.aio.ServicerContext) -> oip_pb2.ModelInferResponse:
        traceparent = tracing.traceparent_from_metadata(context.invocation_metadata())  # "" when tracing is off
        reply, _ = await self._infer(request, context.time_remaining(), _caller(context), stream=False, traceparent=traceparent)
        return reply

    async def ModelStreamInfer(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        parse_message = parser(oip_pb2.ModelInferRequest)
        caller = _caller(context)  # the stream's metadata applies to each request on it
        traceparent = tracing.traceparent_from_metadata(context.invocation_metadata())  # "" when tracing is off

        def parse(raw: Any) -> _StreamItem:
            self._stream_seq += 1
            return _StreamItem(str(self._stream_seq), parse_message(raw))

        async def handle(item: _StreamItem) -> oip_pb2.ModelStreamInferResponse:
            if self._charge_stream_request is not None:
                self._charge_stream_request()
            reply, work = await self._infer(item.message, None, caller, stream=True, traceparent=traceparent)
            if work.final_response_flag:  # one response per request: it is also the final one
                reply.parameters["triton_final_response"].bool_param = True
            return oip_pb2.ModelStreamInferResponse(infer_response=reply)

        def on_error(item: _StreamItem, exc: BaseException) -> oip_pb2.ModelStreamInferResponse:
            code, message = status_of(exc)
            answer = oip_pb2.ModelStreamInferResponse(error_message=f"{code.name}: {message}")
            answer.infer_response.id = item.message.id  # lets the client match the failure to its request
            answer.infer_response.model_name = item.message.model_name
            return answer

        handlers: StreamHandlers[_StreamItem, oip_pb2.ModelStreamInferResponse] = StreamHandlers(
            handle, on_error, parse=parse, empty=lambda: _StreamItem("", oip_pb2.ModelInferRequest())
        )
        await serve_multiplexed(context, handlers, self._max_stream_pending)


def add_oip_servicer(servicer: OipServicer, server: grpc.aio.Server) -> None:
    """Registers the OIP service; every message is parsed in the handler (corrupt -> INVALID_ARGUMENT)."""
    add_parsing_servicer(
        oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server,
        {"ModelStreamInfer": oip_pb2.ModelInferRequest},
    )
