from chiron.v1 import engine_pb2 as _engine_pb2
from chiron.v1 import queue_pb2 as _queue_pb2
from chiron.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouterGenerateRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _types_pb2.InferenceRequest
    def __init__(self, request: _Optional[_Union[_types_pb2.InferenceRequest, _Mapping]] = ...) -> None: ...

class RouterGenerateResponse(_message.Message):
    __slots__ = ("chunk", "instance_id")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    chunk: _engine_pb2.GenerateResponse
    instance_id: str
    def __init__(self, chunk: _Optional[_Union[_engine_pb2.GenerateResponse, _Mapping]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class GenerateManyRequest(_message.Message):
    __slots__ = ("stream_id", "generate", "cancel", "timeout_s")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    generate: RouterGenerateRequest
    cancel: bool
    timeout_s: float
    def __init__(self, stream_id: _Optional[int] = ..., generate: _Optional[_Union[RouterGenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class GenerateManyResponse(_message.Message):
    __slots__ = ("stream_id", "response", "end", "code", "message")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    response: RouterGenerateResponse
    end: bool
    code: int
    message: str
    def __init__(self, stream_id: _Optional[int] = ..., response: _Optional[_Union[RouterGenerateResponse, _Mapping]] = ..., end: _Optional[bool] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _types_pb2.InferenceRequest
    def __init__(self, request: _Optional[_Union[_types_pb2.InferenceRequest, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("request_id", "group_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    group_id: str
    def __init__(self, request_id: _Optional[str] = ..., group_id: _Optional[str] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GetResultResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _queue_pb2.GetRequestResponse
    def __init__(self, result: _Optional[_Union[_queue_pb2.GetRequestResponse, _Mapping]] = ...) -> None: ...

class StreamResultRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class StreamResultResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _queue_pb2.GetRequestResponse
    def __init__(self, result: _Optional[_Union[_queue_pb2.GetRequestResponse, _Mapping]] = ...) -> None: ...

class RouterCancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RouterCancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "interactive_instances", "mixed_instances", "batch_instances")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MIXED_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    BATCH_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    model: str
    interactive_instances: int
    mixed_instances: int
    batch_instances: int
    def __init__(self, model: _Optional[str] = ..., interactive_instances: _Optional[int] = ..., mixed_instances: _Optional[int] = ..., batch_instances: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
