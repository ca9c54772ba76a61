from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORTED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORTED: FinishReason
OPERATION_FIELD_NUMBER: _ClassVar[int]
operation: _descriptor.FieldDescriptor

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed", "ignore_eos", "logprobs", "prompt_logprobs", "detokenize", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    N_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DETOKENIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    detokenize: bool
    min_tokens: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, n: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., detokenize: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "sampling", "request_id", "session_id", "min_weight_version", "max_staleness", "stream_tokens")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STREAM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    sampling: SamplingParams
    request_id: str
    session_id: str
    min_weight_version: int
    max_staleness: int
    stream_tokens: bool
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., min_weight_version: _Optional[int] = ..., max_staleness: _Optional[int] = ..., stream_tokens: _Optional[bool] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs", "top_logprobs", "finish_reason", "stop_reason", "weight_version", "first_weight_version", "token_weight_versions", "index")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_WEIGHT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    finish_reason: FinishReason
    stop_reason: str
    weight_version: int
    first_weight_version: int
    token_weight_versions: _containers.RepeatedCompositeFieldContainer[VersionRun]
    index: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_reason: _Optional[str] = ..., weight_version: _Optional[int] = ..., first_weight_version: _Optional[int] = ..., token_weight_versions: _Optional[_Iterable[_Union[VersionRun, _Mapping]]] = ..., index: _Optional[int] = ...) -> None: ...

class VersionRun(_message.Message):
    __slots__ = ("version", "count")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    version: int
    count: int
    def __init__(self, version: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("prompt_index", "prompt_token_ids", "samples", "prompt_logprobs", "prompt_top_logprobs", "request_id", "cached_prompt_tokens")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    prompt_top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    request_id: str
    cached_prompt_tokens: int
    def __init__(self, prompt_index: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., prompt_top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., request_id: _Optional[str] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions",)
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    def __init__(self, completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoredVersion(_message.Message):
    __slots__ = ("version", "label", "committed_at", "tensors", "bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    label: str
    committed_at: float
    tensors: int
    bytes: int
    def __init__(self, version: _Optional[int] = ..., label: _Optional[str] = ..., committed_at: _Optional[float] = ..., tensors: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[StoredVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[StoredVersion, _Mapping]]] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("requests_total", "requests_running", "prompts_aborted", "sequences_running", "tokens_generated", "requests_rejected_overload", "engine_requests_running", "sequences_waiting", "requests_awaiting_version")
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_ABORTED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_RUNNING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REJECTED_OVERLOAD_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_WAITING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_AWAITING_VERSION_FIELD_NUMBER: _ClassVar[int]
    requests_total: int
    requests_running: int
    prompts_aborted: int
    sequences_running: int
    tokens_generated: int
    requests_rejected_overload: int
    engine_requests_running: int
    sequences_waiting: int
    requests_awaiting_version: int
    def __init__(self, requests_total: _Optional[int] = ..., requests_running: _Optional[int] = ..., prompts_aborted: _Optional[int] = ..., sequences_running: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., requests_rejected_overload: _Optional[int] = ..., engine_requests_running: _Optional[int] = ..., sequences_waiting: _Optional[int] = ..., requests_awaiting_version: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("model", "quantization", "dtype", "weight_version", "max_model_len", "vocab_size", "logprobs_mode", "lm_head_fp32", "max_inflight_sequences", "engine_version", "uptime_s", "counters", "inflight_policy", "last_push", "replicas", "replica_versions", "committed_version", "delta_codecs", "shared_memory")
    class ReplicaVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_MODE_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_FP32_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_POLICY_FIELD_NUMBER: _ClassVar[int]
    LAST_PUSH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_CODECS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    quantization: str
    dtype: str
    weight_version: int
    max_model_len: int
    vocab_size: int
    logprobs_mode: str
    lm_head_fp32: bool
    max_inflight_sequences: int
    engine_version: str
    uptime_s: float
    counters: Counters
    inflight_policy: str
    last_push: PushWeightsResponse
    replicas: int
    replica_versions: _containers.ScalarMap[str, int]
    committed_version: int
    delta_codecs: _containers.RepeatedScalarFieldContainer[str]
    shared_memory: SharedMemory
    def __init__(self, model: _Optional[str] = ..., quantization: _Optional[str] = ..., dtype: _Optional[str] = ..., weight_version: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., logprobs_mode: _Optional[str] = ..., lm_head_fp32: _Optional[bool] = ..., max_inflight_sequences: _Optional[int] = ..., engine_version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., inflight_policy: _Optional[str] = ..., last_push: _Optional[_Union[PushWeightsResponse, _Mapping]] = ..., replicas: _Optional[int] = ..., replica_versions: _Optional[_Mapping[str, int]] = ..., committed_version: _Optional[int] = ..., delta_codecs: _Optional[_Iterable[str]] = ..., shared_memory: _Optional[_Union[SharedMemory, _Mapping]] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("dir", "token")
    DIR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    dir: str
    token: str
    def __init__(self, dir: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "crc32", "delta", "shared")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    crc32: int
    delta: DeltaSpec
    shared: SharedBytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., crc32: _Optional[int] = ..., delta: _Optional[_Union[DeltaSpec, _Mapping]] = ..., shared: _Optional[_Union[SharedBytes, _Mapping]] = ...) -> None: ...

class SharedBytes(_message.Message):
    __slots__ = ("file", "offset")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DeltaSpec(_message.Message):
    __slots__ = ("codec", "base_crc32", "changed", "wire_nbytes")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BASE_CRC32_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    WIRE_NBYTES_FIELD_NUMBER: _ClassVar[int]
    codec: str
    base_crc32: int
    changed: int
    wire_nbytes: int
    def __init__(self, codec: _Optional[str] = ..., base_crc32: _Optional[int] = ..., changed: _Optional[int] = ..., wire_nbytes: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("tensors", "expected_version", "label", "inflight", "delta_base_version")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    expected_version: int
    label: str
    inflight: str
    delta_base_version: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., expected_version: _Optional[int] = ..., label: _Optional[str] = ..., inflight: _Optional[str] = ..., delta_base_version: _Optional[int] = ...) -> None: ...

class PushDeclare(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class PushChunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushCommit(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushWeightsRequest(_message.Message):
    __slots__ = ("header", "chunk", "commit", "declare")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    DECLARE_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: PushChunk
    commit: PushCommit
    declare: PushDeclare
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[PushChunk, _Mapping]] = ..., commit: _Optional[_Union[PushCommit, _Mapping]] = ..., declare: _Optional[_Union[PushDeclare, _Mapping]] = ...) -> None: ...

class LoadWeightsRequest(_message.Message):
    __slots__ = ("url", "expected_version", "label", "inflight")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    url: str
    expected_version: int
    label: str
    inflight: str
    def __init__(self, url: _Optional[str] = ..., expected_version: _Optional[int] = ..., label: _Optional[str] = ..., inflight: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("to_version", "expected_version")
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    to_version: int
    expected_version: int
    def __init__(self, to_version: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class PushWeightsResponse(_message.Message):
    __slots__ = ("version", "bytes_received", "tensors_applied", "receive_s", "requantize_s", "apply_s", "pause_ms", "label", "drain_ms", "samples_in_flight", "replicas_catching_up", "dense_bytes", "delta_tensors", "shared_bytes", "warnings")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    REQUANTIZE_S_FIELD_NUMBER: _ClassVar[int]
    APPLY_S_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_CATCHING_UP_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DELTA_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    version: int
    bytes_received: int
    tensors_applied: int
    receive_s: float
    requantize_s: float
    apply_s: float
    pause_ms: float
    label: str
    drain_ms: float
    samples_in_flight: int
    replicas_catching_up: _containers.RepeatedScalarFieldContainer[str]
    dense_bytes: int
    delta_tensors: int
    shared_bytes: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., bytes_received: _Optional[int] = ..., tensors_applied: _Optional[int] = ..., receive_s: _Optional[float] = ..., requantize_s: _Optional[float] = ..., apply_s: _Optional[float] = ..., pause_ms: _Optional[float] = ..., label: _Optional[str] = ..., drain_ms: _Optional[float] = ..., samples_in_flight: _Optional[int] = ..., replicas_catching_up: _Optional[_Iterable[str]] = ..., dense_bytes: _Optional[int] = ..., delta_tensors: _Optional[int] = ..., shared_bytes: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
