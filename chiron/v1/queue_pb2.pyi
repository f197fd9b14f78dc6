import datetime

from chiron.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueuedRequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUEUED_REQUEST_STATE_UNSPECIFIED: _ClassVar[QueuedRequestState]
    QUEUED_REQUEST_STATE_QUEUED: _ClassVar[QueuedRequestState]
    QUEUED_REQUEST_STATE_LEASED: _ClassVar[QueuedRequestState]
    QUEUED_REQUEST_STATE_DONE: _ClassVar[QueuedRequestState]
    QUEUED_REQUEST_STATE_CANCELLED: _ClassVar[QueuedRequestState]
QUEUED_REQUEST_STATE_UNSPECIFIED: QueuedRequestState
QUEUED_REQUEST_STATE_QUEUED: QueuedRequestState
QUEUED_REQUEST_STATE_LEASED: QueuedRequestState
QUEUED_REQUEST_STATE_DONE: QueuedRequestState
QUEUED_REQUEST_STATE_CANCELLED: QueuedRequestState

class EnqueueRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _types_pb2.InferenceRequest
    def __init__(self, request: _Optional[_Union[_types_pb2.InferenceRequest, _Mapping]] = ...) -> None: ...

class EnqueueResponse(_message.Message):
    __slots__ = ("request_id", "group_id", "deadline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    group_id: str
    deadline: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., group_id: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("worker_id", "max_requests", "models", "lease_timeout_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    max_requests: int
    models: _containers.RepeatedScalarFieldContainer[str]
    lease_timeout_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., max_requests: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., lease_timeout_ms: _Optional[int] = ...) -> None: ...

class LeasedRequest(_message.Message):
    __slots__ = ("lease_id", "request", "group_id", "deadline", "lease_expiry", "attempts")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    request: _types_pb2.InferenceRequest
    group_id: str
    deadline: _timestamp_pb2.Timestamp
    lease_expiry: _timestamp_pb2.Timestamp
    attempts: int
    def __init__(self, lease_id: _Optional[str] = ..., request: _Optional[_Union[_types_pb2.InferenceRequest, _Mapping]] = ..., group_id: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expiry: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeasedRequest]
    def __init__(self, leases: _Optional[_Iterable[_Union[LeasedRequest, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("request_id", "lease_id", "output_tokens", "ttft_ms", "output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lease_id: str
    output_tokens: int
    ttft_ms: float
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., output_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReturnRequest(_message.Message):
    __slots__ = ("request_id", "lease_id", "generated_token_ids", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lease_id: str
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReturnResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("request_id", "lease_id", "lease_timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lease_id: str
    lease_timeout_ms: int
    def __init__(self, request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease_timeout_ms: _Optional[int] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("lease_expiry",)
    LEASE_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    lease_expiry: _timestamp_pb2.Timestamp
    def __init__(self, lease_expiry: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class GetRequestRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GetRequestResponse(_message.Message):
    __slots__ = ("request_id", "state", "group_id", "position", "estimated_wait_mean_s", "estimated_wait_p95_s", "deadline", "attempts", "num_generated_tokens", "output_token_ids", "arrival", "first_leased", "finished")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_P95_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_FIELD_NUMBER: _ClassVar[int]
    FIRST_LEASED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: QueuedRequestState
    group_id: str
    position: int
    estimated_wait_mean_s: float
    estimated_wait_p95_s: float
    deadline: _timestamp_pb2.Timestamp
    attempts: int
    num_generated_tokens: int
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    arrival: _timestamp_pb2.Timestamp
    first_leased: _timestamp_pb2.Timestamp
    finished: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[QueuedRequestState, str]] = ..., group_id: _Optional[str] = ..., position: _Optional[int] = ..., estimated_wait_mean_s: _Optional[float] = ..., estimated_wait_p95_s: _Optional[float] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., arrival: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., first_leased: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class QueueGetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueGetStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: QueueStats
    def __init__(self, stats: _Optional[_Union[QueueStats, _Mapping]] = ...) -> None: ...

class QueueWatchStatsRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class QueueWatchStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: QueueStats
    def __init__(self, stats: _Optional[_Union[QueueStats, _Mapping]] = ...) -> None: ...

class GroupStats(_message.Message):
    __slots__ = ("group_id", "model", "size", "leased", "oldest_arrival", "deadline", "estimated_wait_mean_s", "estimated_wait_p95_s", "slack_s", "projected_slo_violation")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_ARRIVAL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_P95_S_FIELD_NUMBER: _ClassVar[int]
    SLACK_S_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_SLO_VIOLATION_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    model: str
    size: int
    leased: int
    oldest_arrival: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    estimated_wait_mean_s: float
    estimated_wait_p95_s: float
    slack_s: float
    projected_slo_violation: bool
    def __init__(self, group_id: _Optional[str] = ..., model: _Optional[str] = ..., size: _Optional[int] = ..., leased: _Optional[int] = ..., oldest_arrival: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., estimated_wait_mean_s: _Optional[float] = ..., estimated_wait_p95_s: _Optional[float] = ..., slack_s: _Optional[float] = ..., projected_slo_violation: _Optional[bool] = ...) -> None: ...

class ModelCapacity(_message.Message):
    __slots__ = ("model", "throughput_tokens_per_s", "slots")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    throughput_tokens_per_s: float
    slots: int
    def __init__(self, model: _Optional[str] = ..., throughput_tokens_per_s: _Optional[float] = ..., slots: _Optional[int] = ...) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("time", "queued", "leased", "groups", "capacity")
    TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    queued: int
    leased: int
    groups: _containers.RepeatedCompositeFieldContainer[GroupStats]
    capacity: _containers.RepeatedCompositeFieldContainer[ModelCapacity]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queued: _Optional[int] = ..., leased: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[GroupStats, _Mapping]]] = ..., capacity: _Optional[_Iterable[_Union[ModelCapacity, _Mapping]]] = ...) -> None: ...
