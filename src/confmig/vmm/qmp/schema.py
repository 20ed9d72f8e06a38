"""The QMP command set: declarations, argument checking, dispatch.

A command is declared with its QAPI-like argument types and registered with a
decorator; its handler takes the checked arguments and may be sync or async::

    registry = QmpRegistry()

    @registry.command("migrate", args={"uri": Arg(str), "detach": Arg(bool, optional=True)})
    async def migrate(args: dict[str, object]) -> None: ...

Arguments are checked the way QEMU's QObject input visitor checks them, with
its error texts: members in declaration order (missing, then wrong type),
then members nobody declared; nested members are named ``a[0].b``.

Type specs: ``str``, ``int`` (int64), ``float`` (also takes integers),
``bool``, ``object`` (any JSON value), a ``StrEnum`` subclass (QAPI enum;
the handler gets the member), ``Struct({...})`` and ``Array(spec)``.

A handler reports failure by raising ``QmpError``; any other ``ConfmigError``
becomes a ``GenericError`` with its message, anything else a logged
``GenericError``. A handler returning None answers ``{}``, as QEMU does for
commands without a return value.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata
from typing import Final, TypeAlias, TypeVar

from confmig.common.errors import ConfmigError
from confmig.proto.qmp.connection import CommandRequest, ErrorClass

_log = logging.getLogger(__name__)

Handler: TypeAlias = Callable[[dict[str, object]], object]
"""Takes the checked arguments; returns the result or an awaitable of it."""

_H = TypeVar("_H", bound=Handler)

_INT64: Final = range(-(1 << 63), 1 << 63)


class QmpError(ConfmigError):
    """A command failed; ``cls`` and ``desc`` go to the client unchanged."""

    def __init__(self, desc: str, cls: ErrorClass = ErrorClass.GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


@dataclass(frozen=True, slots=True)
class Struct:
    """A JSON object with declared members (a QAPI struct)."""

    members: Mapping[str, Arg]


@dataclass(frozen=True, slots=True)
class Array:
    """A JSON array whose elements all have one type."""

    items: TypeSpec

    def __post_init__(self) -> None:
        _require_spec(self.items)


TypeSpec: TypeAlias = type | Struct | Array


@dataclass(frozen=True, slots=True)
class Arg:
    """One member of a command's arguments or of a ``Struct``."""

    type: TypeSpec
    optional: bool = False

    def __post_init__(self) -> None:
        _require_spec(self.type)


_SCALAR_NAMES: Final[Mapping[type, str]] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
}


def _require_spec(spec: object) -> None:
    if not (
        isinstance(spec, Struct | Array)
        or spec in _SCALAR_NAMES
        or spec is object
        or (isinstance(spec, type) and issubclass(spec, StrEnum))
    ):
        raise TypeError(f"unsupported QMP argument type {spec!r}")


class QMPCapability(StrEnum):
    """QEMU's ``QMPCapability``: what ``qmp_capabilities`` may enable."""

    OOB = "oob"


@dataclass(frozen=True, slots=True)
class _Command:
    handler: Handler
    args: Struct
    allow_oob: bool


def _default_package() -> str:
    try:
        return f"confmig {metadata.version('confmig')}"
    except metadata.PackageNotFoundError:
        return "confmig"


class QmpRegistry:
    """Commands by name, with the built-ins every QMP server has.

    ``version`` and ``package`` are what ``query-version`` reports and, as in
    QEMU, what the greeting carries: the QEMU release whose QMP we speak.
    """

    def __init__(self, *, version: tuple[int, int, int] = (7, 2, 0), package: str | None = None) -> None:
        major, minor, micro = version
        self.version_info: Final[dict[str, object]] = {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": _default_package() if package is None else package,
        }
        self._commands: dict[str, _Command] = {}
        # Negotiation itself happens in the connection once this succeeds.
        self.command("qmp_capabilities", args={"enable": Arg(Array(QMPCapability), optional=True)})(
            lambda args: None
        )
        self.command("query-commands")(lambda args: [{"name": name} for name in self._commands])
        self.command("query-version")(lambda args: self.version_info)

    def command(
        self, name: str, *, args: Mapping[str, Arg] | None = None, allow_oob: bool = False
    ) -> Callable[[_H], _H]:
        """Decorator: register the handler of command ``name``."""
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        struct = Struct(args or {})

        def register(handler: _H) -> _H:
            self._commands[name] = _Command(handler, struct, allow_oob)
            return handler

        return register

    async def dispatch(self, request: CommandRequest) -> object:
        """Run ``request``; every failure is raised as a ``QmpError``."""
        command = self._commands.get(request.name)
        if command is None:
            raise QmpError(f"The command {request.name} has not been found", ErrorClass.COMMAND_NOT_FOUND)
        if request.oob and not command.allow_oob:
            raise QmpError(f"The command {request.name} does not support OOB")
        args = _check_struct(command.args, request.arguments, path="")
        try:
            result = command.handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QmpError:
            raise
        except ConfmigError as exc:
            raise QmpError(str(exc)) from exc
        except Exception as exc:
            _log.exception("QMP command %s failed", request.name)
            raise QmpError(f"Internal error in command {request.name}") from exc
        return {} if result is None else result


def _check(spec: TypeSpec, value: object, name: str | None, path: str) -> object:
    """``value`` checked against ``spec``; ``name`` is None for array elements."""
    # SECURITY: peer-controlled arguments; nothing reaches a handler unchecked.
    if isinstance(spec, Struct):
        if not isinstance(value, dict):
            raise _type_error(path, "object")
        return _check_struct(spec, value, path)
    if isinstance(spec, Array):
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [_check(spec.items, item, None, f"{path}[{i}]") for i, item in enumerate(value)]
    if spec is object:
        return value
    if issubclass(spec, StrEnum):
        if not isinstance(value, str):
            raise _type_error(path, "string")
        try:
            return spec(value)
        except ValueError:
            # QEMU names the bare member here, and "null" for array elements.
            shown = "null" if name is None else name
            raise QmpError(f"Parameter '{shown}' does not accept value '{value}'") from None
    if spec is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if spec is int and isinstance(value, int) and value not in _INT64:
        raise _type_error(path, "integer")
    if type(value) is not spec:
        raise _type_error(path, _SCALAR_NAMES[spec])
    return value


def _check_struct(struct: Struct, value: dict[str, object], path: str) -> dict[str, object]:
    checked: dict[str, object] = {}
    for member, arg in struct.members.items():
        member_path = f"{path}.{member}" if path else member
        if member in value:
            checked[member] = _check(arg.type, value[member], member, member_path)
        elif not arg.optional:
            raise QmpError(f"Parameter '{member_path}' is missing")
    for member in value:
        if member not in struct.members:
            raise QmpError(f"Parameter '{f'{path}.{member}' if path else member}' is unexpected")
    return checked


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")
