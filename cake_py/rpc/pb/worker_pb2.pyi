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
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class WorkerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATUS_UNSPECIFIED: _ClassVar[WorkerStatus]
    WORKER_STATUS_IDLE: _ClassVar[WorkerStatus]
    WORKER_STATUS_LOADING: _ClassVar[WorkerStatus]
    WORKER_STATUS_READY: _ClassVar[WorkerStatus]
    WORKER_STATUS_FAILED: _ClassVar[WorkerStatus]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_FLOAT64: DType
DTYPE_INT16: DType
DTYPE_BOOL: DType
WORKER_STATUS_UNSPECIFIED: WorkerStatus
WORKER_STATUS_IDLE: WorkerStatus
WORKER_STATUS_LOADING: WorkerStatus
WORKER_STATUS_READY: WorkerStatus
WORKER_STATUS_FAILED: WorkerStatus

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("worker_name", "hostname", "os", "device", "backend", "memory_total_bytes", "memory_free_bytes", "tflops", "torch_version", "threads", "cake_version", "python_version", "cpu_count", "ram_total_bytes", "memory_id", "accelerator")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    CAKE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    hostname: str
    os: str
    device: str
    backend: str
    memory_total_bytes: int
    memory_free_bytes: int
    tflops: float
    torch_version: str
    threads: int
    cake_version: str
    python_version: str
    cpu_count: int
    ram_total_bytes: int
    memory_id: str
    accelerator: str
    def __init__(self, worker_name: _Optional[str] = ..., hostname: _Optional[str] = ..., os: _Optional[str] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., tflops: _Optional[float] = ..., torch_version: _Optional[str] = ..., threads: _Optional[int] = ..., cake_version: _Optional[str] = ..., python_version: _Optional[str] = ..., cpu_count: _Optional[int] = ..., ram_total_bytes: _Optional[int] = ..., memory_id: _Optional[str] = ..., accelerator: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("protocol_version", "master_name")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MASTER_NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    master_name: str
    def __init__(self, protocol_version: _Optional[int] = ..., master_name: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("protocol_version", "host", "model_id", "layers", "data_port", "assignment", "held_bytes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    host: HostInfo
    model_id: str
    layers: LayerRange
    data_port: int
    assignment: int
    held_bytes: int
    def __init__(self, protocol_version: _Optional[int] = ..., host: _Optional[_Union[HostInfo, _Mapping]] = ..., model_id: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., data_port: _Optional[int] = ..., assignment: _Optional[int] = ..., held_bytes: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "sha256", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("model_id", "tensors")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, model_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("missing_sha256", "cached_bytes")
    MISSING_SHA256_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    missing_sha256: _containers.RepeatedScalarFieldContainer[str]
    cached_bytes: int
    def __init__(self, missing_sha256: _Optional[_Iterable[str]] = ..., cached_bytes: _Optional[int] = ...) -> None: ...

class AssignHeader(_message.Message):
    __slots__ = ("model_id", "config_json", "layers", "compute_dtype", "tensors")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_json: str
    layers: LayerRange
    compute_dtype: DType
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, model_id: _Optional[str] = ..., config_json: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., compute_dtype: _Optional[_Union[DType, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AssignChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: AssignHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[AssignHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("layers", "received_bytes", "reused_bytes", "n_tensors", "load_ms", "assignment")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REUSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    N_TENSORS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    layers: LayerRange
    received_bytes: int
    reused_bytes: int
    n_tensors: int
    load_ms: int
    assignment: int
    def __init__(self, layers: _Optional[_Union[LayerRange, _Mapping]] = ..., received_bytes: _Optional[int] = ..., reused_bytes: _Optional[int] = ..., n_tensors: _Optional[int] = ..., load_ms: _Optional[int] = ..., assignment: _Optional[int] = ...) -> None: ...

class SequenceSlice(_message.Message):
    __slots__ = ("seq_id", "start_pos", "n_tokens", "copy_from", "rope_end")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COPY_FROM_FIELD_NUMBER: _ClassVar[int]
    ROPE_END_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start_pos: int
    n_tokens: int
    copy_from: int
    rope_end: int
    def __init__(self, seq_id: _Optional[int] = ..., start_pos: _Optional[int] = ..., n_tokens: _Optional[int] = ..., copy_from: _Optional[int] = ..., rope_end: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "sequences", "hidden", "next", "reply_session", "chain_forward_us", "assignment")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_SESSION_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FORWARD_US_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceSlice]
    hidden: Tensor
    next: _containers.RepeatedCompositeFieldContainer[ChainHop]
    reply_session: bytes
    chain_forward_us: _containers.RepeatedScalarFieldContainer[int]
    assignment: int
    def __init__(self, request_id: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceSlice, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., next: _Optional[_Iterable[_Union[ChainHop, _Mapping]]] = ..., reply_session: _Optional[bytes] = ..., chain_forward_us: _Optional[_Iterable[int]] = ..., assignment: _Optional[int] = ...) -> None: ...

class ChainHop(_message.Message):
    __slots__ = ("host", "data_port", "session", "name", "assignment")
    HOST_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    host: str
    data_port: int
    session: bytes
    name: str
    assignment: int
    def __init__(self, host: _Optional[str] = ..., data_port: _Optional[int] = ..., session: _Optional[bytes] = ..., name: _Optional[str] = ..., assignment: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("request_id", "hidden", "forward_us", "error", "chain_forward_us", "chain_error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    FORWARD_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FORWARD_US_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    hidden: Tensor
    forward_us: int
    error: str
    chain_forward_us: _containers.RepeatedScalarFieldContainer[int]
    chain_error: str
    def __init__(self, request_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., forward_us: _Optional[int] = ..., error: _Optional[str] = ..., chain_forward_us: _Optional[_Iterable[int]] = ..., chain_error: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids", "assignment")
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    assignment: int
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ..., assignment: _Optional[int] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class UnassignRequest(_message.Message):
    __slots__ = ("assignment",)
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    assignment: int
    def __init__(self, assignment: _Optional[int] = ...) -> None: ...

class UnassignReply(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("status", "host", "model_id", "layers", "compute_dtype", "live_sequences", "kv_cache_bytes", "weights_bytes", "uptime_seconds", "cpu_percent", "process_rss_bytes", "error", "protocol_version", "forward_idle_seconds", "assignment")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORWARD_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    status: WorkerStatus
    host: HostInfo
    model_id: str
    layers: LayerRange
    compute_dtype: DType
    live_sequences: int
    kv_cache_bytes: int
    weights_bytes: int
    uptime_seconds: float
    cpu_percent: float
    process_rss_bytes: int
    error: str
    protocol_version: int
    forward_idle_seconds: float
    assignment: int
    def __init__(self, status: _Optional[_Union[WorkerStatus, str]] = ..., host: _Optional[_Union[HostInfo, _Mapping]] = ..., model_id: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., compute_dtype: _Optional[_Union[DType, str]] = ..., live_sequences: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., weights_bytes: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., process_rss_bytes: _Optional[int] = ..., error: _Optional[str] = ..., protocol_version: _Optional[int] = ..., forward_idle_seconds: _Optional[float] = ..., assignment: _Optional[int] = ...) -> None: ...
