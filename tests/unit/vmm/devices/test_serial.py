import pytest

from confmig.common.errors import ProtocolError
from confmig.platform.cpu.abi import COM1_PORT
from confmig.vmm.devices.serial import COM1_BASE, UART_LSR, Serial


def test_data_port_bytes_reach_the_sink_in_order() -> None:
    out: list[bytes] = []
    serial = Serial(out.append)
    serial.io_out(COM1_PORT, b"hello ")
    serial.io_out(COM1_PORT, b"world\n")
    serial.io_out(COM1_PORT + 3, b"\x03")  # line control: not console data
    assert b"".join(out) == b"hello world\n"


def test_line_status_says_transmitter_empty() -> None:
    serial = Serial(lambda _: None)
    lsr = serial.io_in(COM1_BASE + UART_LSR, 1)[0]
    assert lsr & 0x20 and lsr & 0x40


def test_state_is_empty_and_rejects_foreign_bytes() -> None:
    serial = Serial(lambda _: None)
    serial.load_state(serial.save_state())
    with pytest.raises(ProtocolError):
        serial.load_state(b"\x01")
