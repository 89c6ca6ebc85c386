from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar
from typing import Optional as _Optional
from typing import Union as _Union

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class Message(_message.Message):
    __slots__ = ("type", "streamId", "ignorable", "payload", "serviceId", "availableServiceIds", "connectionId")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[Message.Type]
        DATA: _ClassVar[Message.Type]
        STREAM_START: _ClassVar[Message.Type]
        STREAM_RESET: _ClassVar[Message.Type]
        SESSION_RESET: _ClassVar[Message.Type]
        SERVICE_IDS: _ClassVar[Message.Type]
        CONNECTION_START: _ClassVar[Message.Type]
        CONNECTION_RESET: _ClassVar[Message.Type]
    UNKNOWN: Message.Type
    DATA: Message.Type
    STREAM_START: Message.Type
    STREAM_RESET: Message.Type
    SESSION_RESET: Message.Type
    SERVICE_IDS: Message.Type
    CONNECTION_START: Message.Type
    CONNECTION_RESET: Message.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STREAMID_FIELD_NUMBER: _ClassVar[int]
    IGNORABLE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SERVICEID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLESERVICEIDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    type: Message.Type
    streamId: int
    ignorable: bool
    payload: bytes
    serviceId: str
    availableServiceIds: _containers.RepeatedScalarFieldContainer[str]
    connectionId: int
    def __init__(self, type: _Optional[_Union[Message.Type, str]] = ..., streamId: _Optional[int] = ..., ignorable: _Optional[bool] = ..., payload: _Optional[bytes] = ..., serviceId: _Optional[str] = ..., availableServiceIds: _Optional[_Iterable[str]] = ..., connectionId: _Optional[int] = ...) -> None: ...
