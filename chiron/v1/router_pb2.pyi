from chiron.v1 import engine_pb2 as _engine_pb2
from chiron.v1 import queue_pb2 as _queue_pb2
from chiron.v1 import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
