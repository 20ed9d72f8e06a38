"""Hostile QMP arguments: the VMM's argument checking (``vmm.qmp.schema``) against any JSON.

The QMP connection's own parser (framing, envelope, negotiation, any bytes in any chunking) is
fuzzed in ``tests/protocol/test_qmp_connection.py``; the live server in
``test_serving_processes``. Here: whatever arguments a client sends to a command of any
declared shape, the handler gets exactly the declared members with the declared types, or
the client gets a ``QmpError`` in QEMU's words, naming the member, and the handler
never runs.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum

import pytest
from hostile import budget
from hypothesis import given
from hypothesis import strategies as st

from confmig.proto.qmp import NO_ID, CommandRequest
from confmig.vmm.qmp.schema import Arg, Array, QmpError, QmpRegistry, Struct

pytestmark = pytest.mark.fuzz


class Mode(StrEnum):
    NORMAL = "normal"
    CPR_TRANSFER = "cpr-transfer"


CAPABILITY = Struct({"capability": Arg(Mode), "state": Arg(bool)})
SHAPES: dict[str, dict[str, Arg]] = {
    "scalars": {"s": Arg(str), "i": Arg(int, optional=True), "f": Arg(float, optional=True),
                "b": Arg(bool, optional=True)},
    "enum": {"mode": Arg(Mode)},
    "nested": {"capabilities": Arg(Array(CAPABILITY))},
    "deep": {"a": Arg(Array(Array(Struct({"x": Arg(int), "y": Arg(object, optional=True)}))), optional=True)},
    "none": {},
}
received: list[dict[str, object]] = []


def registry() -> QmpRegistry:
    r = QmpRegistry()
    for name, args in SHAPES.items():
        r.command(name, args=args)(lambda a: received.append(a))
    return r


REGISTRY = registry()
keys = st.one_of(st.sampled_from(["s", "i", "f", "b", "mode", "capabilities", "capability", "state", "a",
                                  "x", "y"]), st.text(max_size=4))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False),
                    st.sampled_from(["normal", "cpr-transfer", "", "NORMAL"]), st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(keys, inner, max_size=4), max_leaves=10)


def matches(spec: object, value: object) -> bool:
    """The handler's view of a checked value: it has exactly the declared type."""
    if isinstance(spec, Struct):
        return isinstance(value, dict) and set(value) <= set(spec.members) and all(
            matches(spec.members[k].type, v) for k, v in value.items()) and all(
            k in value for k, a in spec.members.items() if not a.optional)
    if isinstance(spec, Array):
        return isinstance(value, list) and all(matches(spec.items, v) for v in value)
    if spec is object:
        return True
    if spec is int:
        return type(value) is int and -(2**63) <= value < 2**63
    is_enum = isinstance(spec, type) and issubclass(spec, StrEnum)
    return type(value) is spec or (is_enum and isinstance(value, spec))


@budget(200)
@given(st.sampled_from([*sorted(SHAPES), "no-such-command"]), st.dictionaries(keys, json_values, max_size=4))
def test_arguments_are_exactly_the_declared_ones_or_a_qemu_error(name: str,
                                                                  arguments: dict[str, object]) -> None:
    received.clear()
    request = CommandRequest(name=name, arguments=arguments, id=NO_ID, oob=False)
    try:
        assert asyncio.run(REGISTRY.dispatch(request)) == {}
    except QmpError as exc:
        assert exc.desc.startswith(("Parameter '", "Invalid parameter type for '", "The command ")), exc.desc
        assert not received
        return
    [checked] = received
    assert matches(Struct(SHAPES[name]), checked)
