"""The VMM's QMP monitor: command registry and server (docs/qmp.md)."""

from confmig.proto.qmp.connection import ErrorClass
from confmig.vmm.qmp.schema import (
    Arg,
    Array,
    QMPCapability,
    QmpError,
    QmpRegistry,
    Struct,
)
from confmig.vmm.qmp.server import QmpServer

__all__ = [
    "Arg",
    "Array",
    "ErrorClass",
    "QMPCapability",
    "QmpError",
    "QmpRegistry",
    "QmpServer",
    "Struct",
]
