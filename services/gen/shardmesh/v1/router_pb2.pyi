from services.gen.shardmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "text", "tokens", "tensor", "attention_mask", "mode", "timeout_ms", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    tokens: TokenIds
    tensor: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    mode: _tensor_pb2.Mode
    timeout_ms: int
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mode: _Optional[_Union[_tensor_pb2.Mode, str]] = ..., timeout_ms: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "output", "route", "hops", "mode", "total_ms", "error", "attempts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: _tensor_pb2.Tensor
    route: _containers.RepeatedScalarFieldContainer[str]
    hops: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.HopRecord]
    mode: _tensor_pb2.Mode
    total_ms: float
    error: _tensor_pb2.Error
    attempts: int
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., route: _Optional[_Iterable[str]] = ..., hops: _Optional[_Iterable[_Union[_tensor_pb2.HopRecord, _Mapping]]] = ..., mode: _Optional[_Union[_tensor_pb2.Mode, str]] = ..., total_ms: _Optional[float] = ..., error: _Optional[_Union[_tensor_pb2.Error, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "tokens", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "stop_strings", "mode", "session_id", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    tokens: TokenIds
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    mode: _tensor_pb2.Mode
    session_id: str
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop_strings: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[_tensor_pb2.Mode, str]] = ..., session_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("token_count", "ttft_ms", "tokens_per_s", "route", "finish_reason", "text", "token_ids", "failovers")
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    token_count: int
    ttft_ms: float
    tokens_per_s: float
    route: _containers.RepeatedScalarFieldContainer[str]
    finish_reason: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    failovers: int
    def __init__(self, token_count: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., route: _Optional[_Iterable[str]] = ..., finish_reason: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., failovers: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("token", "summary")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    summary: GenerateSummary
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("token_id", "text", "index")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    index: int
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class TopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerView(_message.Message):
    __slots__ = ("worker_id", "address", "layers", "model_id", "weights_checksum", "healthy", "outstanding")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    layers: _tensor_pb2.LayerRange
    model_id: str
    weights_checksum: str
    healthy: bool
    outstanding: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., model_id: _Optional[str] = ..., weights_checksum: _Optional[str] = ..., healthy: _Optional[bool] = ..., outstanding: _Optional[int] = ...) -> None: ...

class TopologyResponse(_message.Message):
    __slots__ = ("workers", "route", "discovery", "complete", "problem")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DISCOVERY_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerView]
    route: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.RouteHop]
    discovery: str
    complete: bool
    problem: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerView, _Mapping]]] = ..., route: _Optional[_Iterable[_Union[_tensor_pb2.RouteHop, _Mapping]]] = ..., discovery: _Optional[str] = ..., complete: _Optional[bool] = ..., problem: _Optional[str] = ...) -> None: ...
