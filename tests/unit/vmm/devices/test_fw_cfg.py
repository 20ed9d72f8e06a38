import struct
from collections.abc import Iterator

import pytest

from confmig.common.errors import ConfigError, ProtocolError
from confmig.common.units import GiB, MiB
from confmig.vmm.devices.fw_cfg import (
    FW_CFG_CMDLINE_DATA,
    FW_CFG_CMDLINE_SIZE,
    FW_CFG_DMA_CTL_ERROR,
    FW_CFG_DMA_CTL_READ,
    FW_CFG_DMA_CTL_SELECT,
    FW_CFG_DMA_CTL_SKIP,
    FW_CFG_DMA_CTL_WRITE,
    FW_CFG_DMA_MAX_LENGTH,
    FW_CFG_FILE_DIR,
    FW_CFG_FILE_FIRST,
    FW_CFG_FILE_SLOTS,
    FW_CFG_ID,
    FW_CFG_NB_CPUS,
    FW_CFG_PORT_DATA,
    FW_CFG_PORT_DMA_HI,
    FW_CFG_PORT_DMA_LO,
    FW_CFG_PORT_SEL,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FwCfg,
)
from confmig.vmm.memory import GuestMemory

ACCESS = 0x1000
DATA = 0x2000
FILES = {"opt/ovmf/PcdSevIsMigrationHelper": b"0", "opt/b-second": b"two", "opt/a-first": b"1"}


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.pc(64 * MiB)
    yield mem
    mem.close()


def make(memory: GuestMemory, **kwargs: object) -> FwCfg:
    args: dict[str, object] = {
        "ram_size": memory.ram_size, "nb_cpus": 2, "cmdline": "workload=dirty rate=5",
        "files": FILES,
    }
    args.update(kwargs)
    return FwCfg(memory, **args)  # type: ignore[arg-type]


def dma(dev: FwCfg, memory: GuestMemory, control: int, length: int, address: int = DATA,
        access: int = ACCESS) -> int:
    """Run one DMA transfer as a guest would; return the control word written back."""
    memory.write(access, struct.pack(">IIQ", control, length, address))
    if access >> 32:
        dev.io_out(FW_CFG_PORT_DMA_HI, (access >> 32).to_bytes(4, "big"))
    dev.io_out(FW_CFG_PORT_DMA_LO, (access & 0xFFFF_FFFF).to_bytes(4, "big"))
    return int.from_bytes(memory.read(access, 4), "big")


def read_item(dev: FwCfg, memory: GuestMemory, selector: int, length: int) -> bytes:
    control = (selector << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ
    assert dma(dev, memory, control, length) == 0
    return memory.read(DATA, length)


def test_signature_through_the_data_port(memory: GuestMemory) -> None:
    dev = make(memory)
    dev.io_out(FW_CFG_PORT_SEL, FW_CFG_SIGNATURE.to_bytes(2, "little"))
    assert b"".join(dev.io_in(FW_CFG_PORT_DATA, 1) for _ in range(4)) == b"QEMU"
    assert dev.io_in(FW_CFG_PORT_DATA, 1) == b"\0"  # past the end


def test_dma_register_reads_the_dma_signature(memory: GuestMemory) -> None:
    dev = make(memory)
    sig = dev.io_in(FW_CFG_PORT_DMA_HI, 4) + dev.io_in(FW_CFG_PORT_DMA_LO, 4)
    assert sig == b"QEMU CFG"


def test_numeric_items(memory: GuestMemory) -> None:
    dev = make(memory)
    assert read_item(dev, memory, FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(read_item(dev, memory, FW_CFG_ID, 4), "little") & 0x2  # DMA
    assert int.from_bytes(read_item(dev, memory, FW_CFG_RAM_SIZE, 8), "little") == 64 * MiB
    assert int.from_bytes(read_item(dev, memory, FW_CFG_NB_CPUS, 2), "little") == 2


def test_cmdline_size_counts_the_nul(memory: GuestMemory) -> None:
    dev = make(memory)
    size = int.from_bytes(read_item(dev, memory, FW_CFG_CMDLINE_SIZE, 4), "little")
    assert size == len("workload=dirty rate=5") + 1
    assert read_item(dev, memory, FW_CFG_CMDLINE_DATA, size) == b"workload=dirty rate=5\0"


def parse_dir(raw: bytes) -> dict[str, tuple[int, int]]:
    count = int.from_bytes(raw[:4], "big")
    out = {}
    for i in range(count):
        size, select, _, name = struct.unpack_from(">IHH56s", raw, 4 + 64 * i)
        out[name.rstrip(b"\0").decode()] = (select, size)
    return out


def test_file_dir_lists_files_sorted_from_0x20_and_they_read_back(memory: GuestMemory) -> None:
    dev = make(memory)
    directory = parse_dir(read_item(dev, memory, FW_CFG_FILE_DIR, 4 + 64 * 8))
    assert list(directory) == sorted([*FILES, "etc/e820"])
    selectors = [sel for sel, _ in directory.values()]
    assert selectors == list(range(FW_CFG_FILE_FIRST, FW_CFG_FILE_FIRST + 4))
    for name, data in FILES.items():
        select, size = directory[name]
        assert size == len(data)
        assert read_item(dev, memory, select, size) == data


def test_e820_covers_both_ram_regions() -> None:
    memory = GuestMemory.pc(3 * GiB + 64 * MiB)
    try:
        dev = make(memory)
        select, size = parse_dir(read_item(dev, memory, FW_CFG_FILE_DIR, 4 + 64 * 8))["etc/e820"]
        entries = list(struct.iter_unpack("<QQI", read_item(dev, memory, select, size)))
        assert entries == [(0, 3 * GiB, 1), (4 * GiB, 64 * MiB, 1)]
    finally:
        memory.close()


def test_access_block_above_4g_uses_both_address_halves() -> None:
    memory = GuestMemory.pc(3 * GiB + 64 * MiB)
    try:
        dev = make(memory)
        control = (FW_CFG_SIGNATURE << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ
        assert dma(dev, memory, control, 4, address=4 * GiB + 0x100, access=4 * GiB) == 0
        assert memory.read(4 * GiB + 0x100, 4) == b"QEMU"
    finally:
        memory.close()


def test_dma_writes_are_vmm_dirty_tracked(memory: GuestMemory) -> None:
    dev = make(memory)
    dev.io_out(FW_CFG_PORT_SEL, FW_CFG_SIGNATURE.to_bytes(2, "little"))
    control = FW_CFG_DMA_CTL_READ  # no SELECT: continue the item selected by port
    memory.write(ACCESS, struct.pack(">IIQ", control, 4, 0x5000))
    memory.blocks[0].take_vmm_dirty()  # forget the test's own write
    dev.io_out(FW_CFG_PORT_DMA_LO, ACCESS.to_bytes(4, "big"))
    dirty = memory.blocks[0].take_vmm_dirty()
    assert set(dirty.nonzero()[0]) == {ACCESS >> 12, 0x5000 >> 12}
    assert memory.read(0x5000, 4) == b"QEMU"


def test_reads_past_the_end_zero_fill_and_skip_advances(memory: GuestMemory) -> None:
    dev = make(memory)
    memory.write(DATA, b"\xaa" * 16)
    assert read_item(dev, memory, FW_CFG_SIGNATURE, 8) == b"QEMU\0\0\0\0"
    select = parse_dir(read_item(dev, memory, FW_CFG_FILE_DIR, 4 + 64 * 8))["opt/b-second"][0]
    assert dma(dev, memory, (select << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_SKIP, 1) == 0
    assert dma(dev, memory, FW_CFG_DMA_CTL_READ, 2) == 0
    assert memory.read(DATA, 2) == b"wo"


def test_selector_out_of_range_reads_zeros(memory: GuestMemory) -> None:
    dev = make(memory)
    memory.write(DATA, b"\xaa" * 4)
    assert read_item(dev, memory, FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS, 4) == bytes(4)


@pytest.mark.parametrize(
    ("control", "length", "address"),
    [
        (FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ, 4, 1 << 40),  # no RAM there
        (FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ, 4, 64 * MiB - 2),  # runs off the end of RAM
        (FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ, FW_CFG_DMA_MAX_LENGTH + 1, DATA),
        (FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_WRITE, 4, DATA),  # items are read-only
    ],
)
def test_bad_transfers_set_the_error_bit(
    memory: GuestMemory, control: int, length: int, address: int
) -> None:
    dev = make(memory)
    assert dma(dev, memory, control, length, address) == FW_CFG_DMA_CTL_ERROR
    assert read_item(dev, memory, FW_CFG_SIGNATURE, 4) == b"QEMU"  # still works afterwards


def test_access_block_outside_ram_is_ignored(memory: GuestMemory) -> None:
    dev = make(memory)
    dev.io_out(FW_CFG_PORT_DMA_HI, (1).to_bytes(4, "big"))
    dev.io_out(FW_CFG_PORT_DMA_LO, (0).to_bytes(4, "big"))  # 4 GiB: no RAM in a 64 MiB guest
    assert read_item(dev, memory, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_dma_address_register_resets_after_each_transfer(memory: GuestMemory) -> None:
    dev = make(memory)
    read_item(dev, memory, FW_CFG_SIGNATURE, 4)
    _, _, dma_addr = struct.unpack(">HIQ", dev.save_state())
    assert dma_addr == 0


def test_state_round_trip_continues_mid_item(memory: GuestMemory) -> None:
    src = make(memory)
    src.io_out(FW_CFG_PORT_SEL, FW_CFG_SIGNATURE.to_bytes(2, "little"))
    src.io_in(FW_CFG_PORT_DATA, 1)
    src.io_in(FW_CFG_PORT_DATA, 1)
    dst = make(memory)
    dst.load_state(src.save_state())
    assert dst.io_in(FW_CFG_PORT_DATA, 1) + dst.io_in(FW_CFG_PORT_DATA, 1) == b"MU"
    with pytest.raises(ProtocolError):
        dst.load_state(b"short")


@pytest.mark.parametrize(
    "files",
    [
        {f"opt/f{i}": b"" for i in range(FW_CFG_FILE_SLOTS)},  # plus etc/e820: one too many
        {"opt/" + "x" * 60: b""},
        {"etc/e820": b""},
        {"": b""},
    ],
)
def test_bad_file_sets_are_config_errors(memory: GuestMemory, files: dict[str, bytes]) -> None:
    with pytest.raises(ConfigError):
        make(memory, files=files)
