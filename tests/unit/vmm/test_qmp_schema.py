"""The QMP command registry: declarations, QEMU's argument errors, dispatch."""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum

import pytest

from confmig.common.errors import StateError
from confmig.proto.qmp import NO_ID, CommandRequest, ErrorClass
from confmig.vmm.qmp import Arg, Array, QmpError, QmpRegistry, Struct


class MigrationCapability(StrEnum):
    XBZRLE = "xbzrle"
    EVENTS = "events"


def make_registry() -> QmpRegistry:
    registry = QmpRegistry(version=(7, 2, 0), package="confmig 9.9")

    @registry.command(
        "migrate",
        args={
            "uri": Arg(str),
            "detach": Arg(bool, optional=True),
            "resume": Arg(bool, optional=True),
        },
    )
    def migrate(args: dict[str, object]) -> None:
        assert isinstance(args["uri"], str)

    @registry.command(
        "migrate-set-capabilities",
        args={
            "capabilities": Arg(Array(Struct({"capability": Arg(MigrationCapability), "state": Arg(bool)})))
        },
    )
    def set_capabilities(args: dict[str, object]) -> dict[str, object]:
        return args

    @registry.command(
        "x-types",
        args={
            "i": Arg(int, optional=True),
            "n": Arg(float, optional=True),
            "s": Arg(str, optional=True),
            "b": Arg(bool, optional=True),
            "o": Arg(Struct({}), optional=True),
            "a": Arg(Array(str), optional=True),
            "any": Arg(object, optional=True),
            "e": Arg(Array(MigrationCapability), optional=True),
        },
    )
    def types(args: dict[str, object]) -> dict[str, object]:
        return args

    @registry.command("x-async", allow_oob=True)
    async def async_handler(args: dict[str, object]) -> str:
        await asyncio.sleep(0)
        return "done"

    @registry.command("x-qmp-error")
    def qmp_error(args: dict[str, object]) -> None:
        raise QmpError("No such device", ErrorClass.DEVICE_NOT_FOUND)

    @registry.command("x-confmig-error")
    def confmig_error(args: dict[str, object]) -> None:
        raise StateError("stop", "postmigrate", "running")

    @registry.command("x-bug")
    async def bug(args: dict[str, object]) -> None:
        raise ZeroDivisionError("secret detail")

    return registry


def run(
    registry: QmpRegistry, name: str, arguments: dict[str, object] | None = None, oob: bool = False
) -> object:
    request = CommandRequest(name=name, arguments=arguments or {}, id=NO_ID, oob=oob)
    return asyncio.run(registry.dispatch(request))


def failure(
    registry: QmpRegistry, name: str, arguments: dict[str, object] | None = None, oob: bool = False
) -> tuple[str, str]:
    with pytest.raises(QmpError) as caught:
        run(registry, name, arguments, oob)
    return str(caught.value.cls), caught.value.desc


def test_handlers_sync_and_async_and_none_answers_empty_object() -> None:
    registry = make_registry()
    assert run(registry, "migrate", {"uri": "tcp:0:4444"}) == {}
    assert run(registry, "x-async") == "done"
    assert run(registry, "x-async", oob=True) == "done"


def test_builtins() -> None:
    registry = make_registry()
    assert run(registry, "query-version") == {
        "qemu": {"major": 7, "minor": 2, "micro": 0},
        "package": "confmig 9.9",
    }
    names = [entry["name"] for entry in run(registry, "query-commands")]  # type: ignore[attr-defined]
    assert names[:3] == ["qmp_capabilities", "query-commands", "query-version"]
    assert {"migrate", "x-async"} <= set(names)
    assert run(registry, "qmp_capabilities", {"enable": ["oob"]}) == {}


def test_default_package_names_confmig() -> None:
    package = QmpRegistry().version_info["package"]
    assert isinstance(package, str) and package.startswith("confmig")


def bad_type(path: str, expected: str) -> str:
    return f"Invalid parameter type for '{path}', expected: {expected}"


CAPS = "migrate-set-capabilities"


@pytest.mark.parametrize(
    ("name", "arguments", "desc"),
    [
        ("migrate", {}, "Parameter 'uri' is missing"),
        ("migrate", {"foo": 1}, "Parameter 'uri' is missing"),  # missing before unexpected
        ("migrate", {"uri": "x", "foo": 1}, "Parameter 'foo' is unexpected"),
        ("migrate", {"uri": 1}, bad_type("uri", "string")),
        ("migrate", {"uri": None}, bad_type("uri", "string")),
        ("migrate", {"uri": "x", "detach": 1}, bad_type("detach", "boolean")),
        ("x-types", {"i": "1"}, bad_type("i", "integer")),
        ("x-types", {"i": 1.0}, bad_type("i", "integer")),
        ("x-types", {"i": True}, bad_type("i", "integer")),
        ("x-types", {"i": 2**63}, bad_type("i", "integer")),
        ("x-types", {"n": "1"}, bad_type("n", "number")),
        ("x-types", {"b": "true"}, bad_type("b", "boolean")),
        ("x-types", {"o": []}, bad_type("o", "object")),
        ("x-types", {"o": {"z": 1}}, "Parameter 'o.z' is unexpected"),
        ("x-types", {"a": {}}, bad_type("a", "array")),
        ("x-types", {"a": ["x", 2]}, bad_type("a[1]", "string")),
        # QEMU names the bare member in enum errors, and 'null' for array elements.
        ("x-types", {"e": ["xbzrle", "foo"]}, "Parameter 'null' does not accept value 'foo'"),
        (
            CAPS,
            {"capabilities": [{"capability": "events", "state": True}, {"capability": "foo"}]},
            "Parameter 'capability' does not accept value 'foo'",
        ),
        (
            CAPS,
            {"capabilities": [{"capability": "events"}]},
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            CAPS,
            {"capabilities": [{"capability": 1, "state": True}]},
            bad_type("capabilities[0].capability", "string"),
        ),
        (
            CAPS,
            {"capabilities": [{"capability": "events", "state": True, "x": 0}]},
            "Parameter 'capabilities[0].x' is unexpected",
        ),
        ("qmp_capabilities", {"enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
        ("qmp_capabilities", {"enable": "oob"}, bad_type("enable", "array")),
    ],
)
def test_argument_errors_are_qemus(name: str, arguments: dict[str, object], desc: str) -> None:
    assert failure(make_registry(), name, arguments) == ("GenericError", desc)


def test_unknown_command() -> None:
    assert failure(make_registry(), "nope") == (
        "CommandNotFound",
        "The command nope has not been found",
    )


def test_checked_arguments() -> None:
    registry = make_registry()
    arguments: dict[str, object] = {
        "i": -(2**63), "n": 3, "s": "", "b": False, "o": {}, "a": [], "any": [{"x": None}],
        "e": ["events"],
    }  # fmt: skip
    checked = run(registry, "x-types", arguments)
    assert checked == {**arguments, "n": 3.0, "e": [MigrationCapability.EVENTS]}
    assert isinstance(checked, dict) and type(checked["n"]) is float
    assert run(
        registry,
        "migrate-set-capabilities",
        {"capabilities": [{"state": False, "capability": "xbzrle"}]},
    ) == {"capabilities": [{"capability": MigrationCapability.XBZRLE, "state": False}]}


def test_oob_only_for_commands_that_allow_it() -> None:
    registry = make_registry()
    assert failure(registry, "migrate", {"uri": "x"}, oob=True) == (
        "GenericError",
        "The command migrate does not support OOB",
    )
    assert failure(registry, "nope", oob=True)[0] == "CommandNotFound"


def test_handler_errors(caplog: pytest.LogCaptureFixture) -> None:
    registry = make_registry()
    assert failure(registry, "x-qmp-error") == ("DeviceNotFound", "No such device")
    assert failure(registry, "x-confmig-error") == (
        "GenericError",
        "stop not allowed in state postmigrate (requires running)",
    )
    with caplog.at_level(logging.ERROR, logger="confmig.vmm.qmp.schema"):
        assert failure(registry, "x-bug") == ("GenericError", "Internal error in command x-bug")
    assert "x-bug" in caplog.text and "ZeroDivisionError" in caplog.text
    assert run(registry, "x-async") == "done"  # the registry still works


def test_declaration_errors() -> None:
    registry = make_registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.command("migrate")
    with pytest.raises(TypeError, match="unsupported"):
        Arg(dict)
    with pytest.raises(TypeError, match="unsupported"):
        Array(list)
