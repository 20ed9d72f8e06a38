"""QMP, the QEMU Machine Protocol: the sans-IO server side."""

from confmig.proto.qmp.connection import (
    MAX_MESSAGE_SIZE,
    MAX_NESTING,
    NEED_DATA,
    NO_ID,
    CommandRequest,
    ConnectionClosed,
    ErrorClass,
    NegotiationState,
    QmpServerConnection,
)

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MAX_NESTING",
    "NEED_DATA",
    "NO_ID",
    "CommandRequest",
    "ConnectionClosed",
    "ErrorClass",
    "NegotiationState",
    "QmpServerConnection",
]
