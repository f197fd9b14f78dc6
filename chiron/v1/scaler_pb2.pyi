import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoleDecision(_message.Message):
    __slots__ = ("role", "current", "wanted", "desired", "reason")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    role: str
    current: int
    wanted: float
    desired: int
    reason: str
    def __init__(self, role: _Optional[str] = ..., current: _Optional[int] = ..., wanted: _Optional[float] = ..., desired: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ScalerDecision(_message.Message):
    __slots__ = ("time", "roles", "theta", "batch_backpressure", "inputs", "advisory", "actions", "errors")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TIME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    BATCH_BACKPRESSURE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ADVISORY_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    roles: _containers.RepeatedCompositeFieldContainer[RoleDecision]
    theta: float
    batch_backpressure: float
    inputs: _containers.ScalarMap[str, float]
    advisory: bool
    actions: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., roles: _Optional[_Iterable[_Union[RoleDecision, _Mapping]]] = ..., theta: _Optional[float] = ..., batch_backpressure: _Optional[float] = ..., inputs: _Optional[_Mapping[str, float]] = ..., advisory: _Optional[bool] = ..., actions: _Optional[_Iterable[str]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class GetDecisionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDecisionResponse(_message.Message):
    __slots__ = ("decision",)
    DECISION_FIELD_NUMBER: _ClassVar[int]
    decision: ScalerDecision
    def __init__(self, decision: _Optional[_Union[ScalerDecision, _Mapping]] = ...) -> None: ...

class WatchDecisionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchDecisionsResponse(_message.Message):
    __slots__ = ("decision",)
    DECISION_FIELD_NUMBER: _ClassVar[int]
    decision: ScalerDecision
    def __init__(self, decision: _Optional[_Union[ScalerDecision, _Mapping]] = ...) -> None: ...
