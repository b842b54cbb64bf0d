from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_DIRECT: _ClassVar[Mode]
    MODE_RELAY: _ClassVar[Mode]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_ROUTER: _ClassVar[Source]
    SOURCE_UPSTREAM_WORKER: _ClassVar[Source]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
MODE_UNSPECIFIED: Mode
MODE_DIRECT: Mode
MODE_RELAY: Mode
SOURCE_UNSPECIFIED: Source
SOURCE_ROUTER: Source
SOURCE_UPSTREAM_WORKER: Source

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "chunk_count", "chunk_index", "shm_handle")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    chunk_count: int
    chunk_index: int
    shm_handle: str
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., chunk_count: _Optional[int] = ..., chunk_index: _Optional[int] = ..., shm_handle: _Optional[str] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class RouteHop(_message.Message):
    __slots__ = ("worker_id", "address", "layers")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    layers: LayerRange
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class HopRecord(_message.Message):
    __slots__ = ("worker_id", "layers", "source", "source_worker_id", "compute_ms", "hop_ms", "queue_ms", "input_transport", "batch_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    HOP_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    layers: LayerRange
    source: Source
    source_worker_id: str
    compute_ms: float
    hop_ms: float
    queue_ms: float
    input_transport: str
    batch_size: int
    def __init__(self, worker_id: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., source: _Optional[_Union[Source, str]] = ..., source_worker_id: _Optional[str] = ..., compute_ms: _Optional[float] = ..., hop_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., input_transport: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "failed_worker_id", "failed_address", "failed_layers", "pending_input")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILED_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FAILED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_INPUT_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    failed_worker_id: str
    failed_address: str
    failed_layers: LayerRange
    pending_input: Tensor
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., failed_worker_id: _Optional[str] = ..., failed_address: _Optional[str] = ..., failed_layers: _Optional[_Union[LayerRange, _Mapping]] = ..., pending_input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
