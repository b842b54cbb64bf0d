from services.gen.shardmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "input", "attention_mask", "layers", "model_checksum", "timeout_ms", "cancel", "downstream", "mode", "source", "source_worker_id", "upstream_hops", "session_id", "position", "session_ttl_s", "return_logits_only_last", "reply_shm", "reply_dtype", "hop_timeout_ms", "route_mac", "route_expires_ms", "session_key", "priority", "traceparent", "replay_step_lengths")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_HOPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_ONLY_LAST_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHM_FIELD_NUMBER: _ClassVar[int]
    REPLY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HOP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_MAC_FIELD_NUMBER: _ClassVar[int]
    ROUTE_EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_STEP_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    layers: _tensor_pb2.LayerRange
    model_checksum: str
    timeout_ms: int
    cancel: bool
    downstream: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.RouteHop]
    mode: _tensor_pb2.Mode
    source: _tensor_pb2.Source
    source_worker_id: str
    upstream_hops: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.HopRecord]
    session_id: str
    position: int
    session_ttl_s: int
    return_logits_only_last: bool
    reply_shm: bool
    reply_dtype: _tensor_pb2.DType
    hop_timeout_ms: int
    route_mac: bytes
    route_expires_ms: int
    session_key: bytes
    priority: int
    traceparent: str
    replay_step_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., model_checksum: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., cancel: _Optional[bool] = ..., downstream: _Optional[_Iterable[_Union[_tensor_pb2.RouteHop, _Mapping]]] = ..., mode: _Optional[_Union[_tensor_pb2.Mode, str]] = ..., source: _Optional[_Union[_tensor_pb2.Source, str]] = ..., source_worker_id: _Optional[str] = ..., upstream_hops: _Optional[_Iterable[_Union[_tensor_pb2.HopRecord, _Mapping]]] = ..., session_id: _Optional[str] = ..., position: _Optional[int] = ..., session_ttl_s: _Optional[int] = ..., return_logits_only_last: _Optional[bool] = ..., reply_shm: _Optional[bool] = ..., reply_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., hop_timeout_ms: _Optional[int] = ..., route_mac: _Optional[bytes] = ..., route_expires_ms: _Optional[int] = ..., session_key: _Optional[bytes] = ..., priority: _Optional[int] = ..., traceparent: _Optional[str] = ..., replay_step_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("request_id", "output", "hops", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: _tensor_pb2.Tensor
    hops: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.HopRecord]
    error: _tensor_pb2.Error
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., hops: _Optional[_Iterable[_Union[_tensor_pb2.HopRecord, _Mapping]]] = ..., error: _Optional[_Union[_tensor_pb2.Error, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_inflight", "inflight", "cache_budget_bytes", "cache_used_bytes", "sessions", "max_tensor_bytes", "speed", "memory_bytes")
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_inflight: int
    inflight: int
    cache_budget_bytes: int
    cache_used_bytes: int
    sessions: int
    max_tensor_bytes: int
    speed: float
    memory_bytes: int
    def __init__(self, max_inflight: _Optional[int] = ..., inflight: _Optional[int] = ..., cache_budget_bytes: _Optional[int] = ..., cache_used_bytes: _Optional[int] = ..., sessions: _Optional[int] = ..., max_tensor_bytes: _Optional[int] = ..., speed: _Optional[float] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("worker_id", "model_id", "architecture", "layers", "total_layers", "dtype", "weights_checksum", "version", "capacity", "state", "address", "hidden_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model_id: str
    architecture: str
    layers: _tensor_pb2.LayerRange
    total_layers: int
    dtype: str
    weights_checksum: str
    version: str
    capacity: Capacity
    state: str
    address: str
    hidden_size: int
    def __init__(self, worker_id: _Optional[str] = ..., model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., total_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., weights_checksum: _Optional[str] = ..., version: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., state: _Optional[str] = ..., address: _Optional[str] = ..., hidden_size: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "session_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_key: bytes
    def __init__(self, session_id: _Optional[str] = ..., session_key: _Optional[bytes] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...
