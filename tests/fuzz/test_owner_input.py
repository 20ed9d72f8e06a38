"""Hostile bodies for the guest owner's HTTP service (and the replies its clients read), and
hostile OVMF tables (the firmware image the user gives, read by the VMM and by the owner).

A body decodes to its message or raises ``KeyBrokerMessageError``, whatever JSON it holds:
the right field names with values of any type or size, repeated fields, nesting deeper than a
recursive parser goes. ``tests/protocol/test_keybroker.py`` checks truncations and byte changes
of valid bodies; the live service is in ``test_serving_processes``. The OVMF table parser never
raises: a table it cannot read has no entries, as in QEMU.
"""

from __future__ import annotations

import json
import struct
import uuid

import pytest
from hostile import budget
from hypothesis import given
from hypothesis import strategies as st

from confmig.common.errors import KeyBrokerMessageError
from confmig.proto import keybroker, ovmf_table
from confmig.proto.keybroker import (
    DecisionRequest,
    DecisionResponse,
    ErrorReply,
    HealthResponse,
    LaunchRequest,
    LaunchResponse,
    MeasurementRequest,
    SecretResponse,
)

pytestmark = pytest.mark.fuzz

KINDS = [LaunchRequest, LaunchResponse, MeasurementRequest, SecretResponse, DecisionRequest,
         DecisionResponse, HealthResponse, ErrorReply]
FIELDS = ["vm", "pdh", "cert_chain", "policy", "migration_target", "session_id", "godh", "session",
          "measurement", "api_major", "api_minor", "build", "secret_header", "secret", "guest_len",
          "status", "error", "ticket", "migration_id", "challenge", "outcome", "token"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["", "=", "AA==", "AAA=", "ab" * 16, "ok", "a" * 2000]),
    st.integers(0, 3000).map(lambda n: "QUFB" * n),  # base64 of many sizes
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
objects = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), values, max_size=7)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object", "repeated", "deep", "value", "bytes"]))
    if kind == "object":
        return json.dumps(draw(objects)).encode()
    if kind == "repeated":
        name = draw(st.sampled_from(FIELDS))
        return b'{"%s": 1, "%s": 2}' % (name.encode(), name.encode())
    if kind == "deep":
        depth = draw(st.integers(1, 50_000))
        return b'{"vm": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "value":
        return json.dumps(draw(values)).encode()
    return draw(st.binary(max_size=keybroker.MAX_BODY // 64))


@budget(150)
@given(bodies())
def test_every_body_is_its_message_or_a_message_error(body: bytes) -> None:
    for kind in KINDS:
        try:
            message = keybroker.decode(kind, body)
        except KeyBrokerMessageError as exc:
            assert str(exc).isprintable() and len(str(exc)) < 300
            continue
        assert keybroker.decode(kind, keybroker.encode(message)) == message


@budget(60)
@given(st.integers(-1, 1000), bodies())
def test_every_http_answer_is_a_reply_an_error_or_a_message_error(status: int, body: bytes) -> None:
    try:
        reply = keybroker.decode_reply(LaunchResponse, status, body)
    except KeyBrokerMessageError:
        return
    assert isinstance(reply, LaunchResponse if status == 200 else ErrorReply)


# --- OVMF's GUIDed table ------------------------------------------------------------------------

guids = st.one_of(st.sampled_from([ovmf_table.SEV_SECRET_BLOCK_GUID, ovmf_table.MIGRATION_HANDLER_BLOCK_GUID,
                                   ovmf_table.OVMF_TABLE_FOOTER_GUID]),
                  st.binary(min_size=16, max_size=16).map(lambda b: uuid.UUID(bytes_le=b)))


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A firmware image ending in a table whose lengths may lie, or in anything at all."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    entries = draw(st.lists(st.tuples(guids, st.binary(max_size=48)), max_size=4))
    table = bytearray(ovmf_table.encode_table(entries))
    for _ in range(draw(st.integers(0, 2))):  # lengths that lie
        at = draw(st.integers(0, max(len(table) - 2, 0)))
        table[at : at + 2] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
    padding = draw(st.binary(max_size=16))
    return padding + bytes(table) + bytes(ovmf_table.RESET_VECTOR_TAIL)


@budget(100)
@given(images())
def test_any_image_gives_a_table_and_blocks_or_none(image: bytes) -> None:
    table = ovmf_table.parse_table(image)
    assert sum(len(v) + 18 for v in table.values()) <= len(image)
    area = ovmf_table.secret_area(table)
    assert area is None or all(0 <= x < 2**32 for x in area)
    handler = ovmf_table.migration_handler(table)
    assert handler is None or (handler.version != 0 and handler.mailbox_size != 0
                               and handler.area_size >= handler.mailbox_size)
