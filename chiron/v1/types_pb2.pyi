import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_ROLE_UNSPECIFIED: _ClassVar[InstanceRole]
    INSTANCE_ROLE_INTERACTIVE: _ClassVar[InstanceRole]
    INSTANCE_ROLE_MIXED: _ClassVar[InstanceRole]
    INSTANCE_ROLE_BATCH: _ClassVar[InstanceRole]

class RequestClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_CLASS_UNSPECIFIED: _ClassVar[RequestClass]
    REQUEST_CLASS_INTERACTIVE: _ClassVar[RequestClass]
    REQUEST_CLASS_BATCH: _ClassVar[RequestClass]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_EVICTED: _ClassVar[FinishReason]
INSTANCE_ROLE_UNSPECIFIED: InstanceRole
INSTANCE_ROLE_INTERACTIVE: InstanceRole
INSTANCE_ROLE_MIXED: InstanceRole
INSTANCE_ROLE_BATCH: InstanceRole
REQUEST_CLASS_UNSPECIFIED: RequestClass
REQUEST_CLASS_INTERACTIVE: RequestClass
REQUEST_CLASS_BATCH: RequestClass
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_EVICTED: FinishReason

class SLO(_message.Message):
    __slots__ = ("ttft_ms", "itl_ms", "slo_class")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: int
    itl_ms: int
    slo_class: str
    def __init__(self, ttft_ms: _Optional[int] = ..., itl_ms: _Optional[int] = ..., slo_class: _Optional[str] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "prompt", "max_tokens", "slo", "request_class", "resume_token_ids", "ignore_eos", "arrival_time", "stream_interval")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CLASS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt: str
    max_tokens: int
    slo: SLO
    request_class: RequestClass
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    arrival_time: _timestamp_pb2.Timestamp
    stream_interval: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., slo: _Optional[_Union[SLO, _Mapping]] = ..., request_class: _Optional[_Union[RequestClass, str]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., arrival_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream_interval: _Optional[int] = ...) -> None: ...

class RequestProgress(_message.Message):
    __slots__ = ("request_id", "generated_token_ids", "num_prompt_tokens", "kv_offloaded_tokens", "kv_offload_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_OFFLOADED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_OFFLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    kv_offloaded_tokens: int
    kv_offload_ms: float
    def __init__(self, request_id: _Optional[str] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., kv_offloaded_tokens: _Optional[int] = ..., kv_offload_ms: _Optional[float] = ...) -> None: ...

class EngineStats(_message.Message):
    __slots__ = ("instance_id", "role", "model", "backend", "time", "num_running", "num_waiting", "max_batch_size", "kv_cache_usage", "kv_cache_capacity_tokens", "itl_p50_ms", "itl_p95_ms", "ttft_p50_ms", "throughput_tokens_per_s", "num_preemptions_total", "generated_tokens_total", "finished_requests_total", "latency_backpressure", "throughput_backpressure", "itl_slo_ms", "num_batch_requests", "batch_finished_total", "late_control_steps_total", "interactive_prompt_tokens_mean")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ITL_P50_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P95_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BACKPRESSURE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_BACKPRESSURE_FIELD_NUMBER: _ClassVar[int]
    ITL_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FINISHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LATE_CONTROL_STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_PROMPT_TOKENS_MEAN_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: InstanceRole
    model: str
    backend: str
    time: _timestamp_pb2.Timestamp
    num_running: int
    num_waiting: int
    max_batch_size: int
    kv_cache_usage: float
    kv_cache_capacity_tokens: int
    itl_p50_ms: float
    itl_p95_ms: float
    ttft_p50_ms: float
    throughput_tokens_per_s: float
    num_preemptions_total: int
    generated_tokens_total: int
    finished_requests_total: int
    latency_backpressure: float
    throughput_backpressure: float
    itl_slo_ms: int
    num_batch_requests: int
    batch_finished_total: int
    late_control_steps_total: int
    interactive_prompt_tokens_mean: float
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[InstanceRole, str]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., kv_cache_capacity_tokens: _Optional[int] = ..., itl_p50_ms: _Optional[float] = ..., itl_p95_ms: _Optional[float] = ..., ttft_p50_ms: _Optional[float] = ..., throughput_tokens_per_s: _Optional[float] = ..., num_preemptions_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., finished_requests_total: _Optional[int] = ..., latency_backpressure: _Optional[float] = ..., throughput_backpressure: _Optional[float] = ..., itl_slo_ms: _Optional[int] = ..., num_batch_requests: _Optional[int] = ..., batch_finished_total: _Optional[int] = ..., late_control_steps_total: _Optional[int] = ..., interactive_prompt_tokens_mean: _Optional[float] = ...) -> None: ...
