"""Memory encryption as the guest sees it (``guest/mem_encrypt.py``), on the fake vCPU's
C-bit model, and the model itself: what a test relies on to catch a missing C-bit."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from fakecpu import MIGRATION_FEATURES, FakeCpu

from confmig.common.units import PAGE_SIZE, MiB
from confmig.guest import layout, mem_encrypt
from confmig.platform.cpu.abi import (
    C_BIT,
    CPUID_AMD_SEV,
    KVM_CPUID_SIGNATURE,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    RESET_VECTOR,
    GuestCpu,
    GuestFault,
    RomRegion,
)
from confmig.vmm.memory import GuestMemory

GPA = 0x20_0000
U64 = (1 << 64) - 1


@contextmanager
def bare_cpu(**kwargs: object) -> Iterator[FakeCpu]:
    memory = GuestMemory.pc(16 * MiB)
    try:
        yield FakeCpu(memory, [], **kwargs)  # type: ignore[arg-type]
    finally:
        memory.close()


def program(body: Callable[[GuestCpu], None]) -> list[RomRegion]:
    return [RomRegion(name="test", base=RESET_VECTOR, size=16, step=body)]


# --- the fake's model of the C-bit -----------------------------------------------------------


def test_a_private_write_reaches_ram_only_as_ciphertext() -> None:
    with bare_cpu(sev=True) as cpu:
        data = b"guest secret " * 400  # 5200 bytes: crosses into the next page
        cpu.write((GPA + 100) | C_BIT, data)
        assert cpu.read((GPA + 100) | C_BIT, len(data)) == data
        raw = cpu.memory.read(GPA + 100, len(data))
        assert b"guest secret" not in raw
        assert cpu.shared_pages == set()
        assert cpu.read(GPA + 100, len(data)) == raw  # without the C-bit: the ciphertext
        assert cpu.shared_pages == {GPA // PAGE_SIZE, GPA // PAGE_SIZE + 1}


def test_ciphertext_moved_to_another_gpa_decrypts_to_garbage() -> None:
    with bare_cpu(sev=True) as cpu:
        page = np.frombuffer(bytes(range(256)) * 16, dtype=np.uint8).reshape(1, PAGE_SIZE)
        cpu.write_pages(GPA | C_BIT, page)
        assert np.array_equal(cpu.read_pages(GPA | C_BIT, 1), page)
        cpu.memory.write(GPA + PAGE_SIZE, cpu.memory.read(GPA, PAGE_SIZE))  # the host copies it
        assert cpu.read((GPA + PAGE_SIZE) | C_BIT, PAGE_SIZE) != page.tobytes()


def test_the_keystream_depends_on_the_key() -> None:
    with bare_cpu(sev=True, key=1) as one, bare_cpu(sev=True, key=2) as two:
        one.write(GPA | C_BIT, b"x" * 64)
        two.memory.write(GPA, one.memory.read(GPA, 64))  # another host's memory key
        assert two.read(GPA | C_BIT, 64) != b"x" * 64


def test_the_c_bit_in_a_plain_guest_is_a_fault() -> None:
    with bare_cpu() as cpu:
        cpu.run(program(lambda c: c.write(GPA | C_BIT, b"x")), until=lambda c: c.steps > 0)
        assert cpu.shutdown_reason is not None and "C-bit" in cpu.shutdown_reason


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sev", "features", "mask", "reports"),
    [
        (False, 0, 0, False),
        (False, MIGRATION_FEATURES, 0, False),
        (True, 0, C_BIT, False),
        (True, MIGRATION_FEATURES, C_BIT, True),
    ],
)
def test_detection(sev: bool, features: int, mask: int, reports: bool) -> None:
    with bare_cpu(sev=sev, kvm_features=features) as cpu:
        assert mem_encrypt.encryption_mask(cpu) == mask
        assert mem_encrypt.private(cpu, GPA) == GPA | mask
        assert mem_encrypt.private(cpu, GPA, 0) == GPA  # a mask the step already knows wins
        assert mem_encrypt.has_migration_control(cpu) is bool(features)
        assert mem_encrypt.reports_page_state(cpu) is reports
        assert mem_encrypt.c_bit_position(cpu) == (51 if sev else 0)


def test_a_cpu_with_sev_running_a_plain_guest_has_no_mask() -> None:
    with bare_cpu() as cpu:
        cpu.cpuid_table[CPUID_AMD_SEV] = (1 << 1, 51 | 1 << 6, 0, 0)  # the CPU could; this guest is not
        assert mem_encrypt.sev_status(cpu) == 0
        assert mem_encrypt.encryption_mask(cpu) == 0


def test_without_the_kvm_signature_there_are_no_kvm_features() -> None:
    with bare_cpu(sev=True, kvm_features=MIGRATION_FEATURES) as cpu:
        del cpu.cpuid_table[KVM_CPUID_SIGNATURE]
        assert mem_encrypt.kvm_features(cpu) == 0
        assert not mem_encrypt.reports_page_state(cpu)


# --- page-state changes -----------------------------------------------------------------------


def test_moving_pages_to_shared_and_back_keeps_their_contents() -> None:
    with bare_cpu(sev=True) as cpu:
        data = np.random.default_rng(1).integers(0, 256, (3, PAGE_SIZE), dtype=np.uint8)
        cpu.write_pages(GPA | C_BIT, data)
        assert cpu.memory.read(GPA, 3 * PAGE_SIZE) != data.tobytes()
        mem_encrypt.move_to_shared(cpu, GPA, 3)
        assert cpu.memory.read(GPA, 3 * PAGE_SIZE) == data.tobytes()  # the host sees it now
        mem_encrypt.move_to_private(cpu, GPA, 3)
        assert cpu.memory.read(GPA, 3 * PAGE_SIZE) != data.tobytes()
        assert np.array_equal(cpu.read_pages(GPA | C_BIT, 3), data)


def test_page_state_changes_are_no_ops_in_a_plain_guest() -> None:
    with bare_cpu() as cpu:
        cpu.write(GPA, b"plain")
        mem_encrypt.move_to_shared(cpu, GPA, 1)
        mem_encrypt.move_to_private(cpu, GPA, 1)
        assert cpu.memory.read(GPA, 5) == b"plain"


def test_the_page_state_list_follows_every_change() -> None:
    with bare_cpu(sev=True) as cpu:
        mem_encrypt.clear_page_state(cpu, C_BIT)
        gfn = GPA // PAGE_SIZE + 6  # the run crosses a byte of the list
        mem_encrypt.move_to_shared(cpu, gfn * PAGE_SIZE, 5, C_BIT)
        mem_encrypt.move_to_private(cpu, (gfn + 2) * PAGE_SIZE, 1, C_BIT)
        around = np.arange(gfn - 2, gfn + 8, dtype=np.int64)
        assert mem_encrypt.shared_pages(cpu, around, C_BIT).tolist() == [
            False, False, True, True, False, True, True, False, False, False]
        assert cpu.memory.read(layout.PAGE_STATE_GPA, layout.PAGE_STATE_SIZE) != bytes(
            layout.PAGE_STATE_SIZE)  # the list itself is private: the host sees ciphertext


def test_pages_shared_with_zero_read_as_zeros_and_pages_from_16_gib_stay_private() -> None:
    with bare_cpu(sev=True) as cpu:
        mem_encrypt.clear_page_state(cpu, C_BIT)
        cpu.write(GPA | C_BIT, b"old contents")
        mem_encrypt.move_to_shared(cpu, GPA, 1, C_BIT, zero=True)
        assert cpu.memory.read(GPA, PAGE_SIZE) == bytes(PAGE_SIZE)
        with pytest.raises(GuestFault, match="stay private"):
            mem_encrypt.move_to_shared(cpu, layout.PAGE_STATE_LIMIT - PAGE_SIZE, 2, C_BIT)


@pytest.mark.parametrize(
    ("gpa", "npages"), [(GPA + 8, 1), (GPA, 0), (GPA, mem_encrypt.PAGE_STATE_BATCH + 1)]
)
def test_page_state_changes_are_whole_pages_in_bounded_batches(gpa: int, npages: int) -> None:
    with bare_cpu(sev=True) as cpu, pytest.raises(GuestFault):
        mem_encrypt.move_to_shared(cpu, gpa, npages)


def test_map_gpa_range_exits_and_its_result_arrives_in_the_next_step() -> None:
    seen: list[int] = []

    def step(cpu: GuestCpu) -> None:
        seen.append(mem_encrypt.hypercall_error(cpu.regs.rax))
        mem_encrypt.map_gpa_range(cpu, GPA, 4, encrypted=len(seen) == 2)

    with bare_cpu(sev=True, hypercall_result=-KVM_ENOSYS) as cpu:
        cpu.run(program(step), until=lambda c: c.steps == 2)
        assert seen == [0, -KVM_ENOSYS]
        assert cpu.hypercalls == [
            (KVM_HC_MAP_GPA_RANGE, GPA, 4, 0, 0),
            (KVM_HC_MAP_GPA_RANGE, GPA, 4, KVM_MAP_GPA_RANGE_ENCRYPTED, 0),
        ]


def test_hypercall_results_and_the_failure_line() -> None:
    assert mem_encrypt.hypercall_error(0) == 0
    assert mem_encrypt.hypercall_error(-22 & U64) == -22
    assert mem_encrypt.hypercall_error(-1000) == -1000
    assert mem_encrypt.hypercall_failure_line("kv", -1000 & U64) == (
        "confmig kv: KVM_HC_MAP_GPA_RANGE failed with -1000 (KVM_CAP_EXIT_HYPERCALL not enabled); "
        "page-state changes are not reported to the host"
    )
    assert mem_encrypt.hypercall_failure_line("kv", -22 & U64) == (
        "confmig kv: KVM_HC_MAP_GPA_RANGE failed with -22; page-state changes are not reported to the host"
    )


# --- private bitmaps (the MH's imported pages, the page-state list) --------------------------


BITMAP_SETS = {
    "across-pages": [7, 8, 9, 300, 32767, 32768, 65540, 2 * 32768 + 5],
    "one-page": [300, 7, 8, 9, 15, 16, 4000, 9],  # a batch's usual span, unordered, one bit twice
}


@pytest.mark.parametrize("gfn_list", BITMAP_SETS.values(), ids=BITMAP_SETS.keys())
def test_bitmap_bits_set_and_read_only_the_bits_named(gfn_list: list[int]) -> None:
    with bare_cpu(sev=True) as cpu:
        base = layout.mh_imported(0)
        before = np.frombuffer(np.random.default_rng(5).bytes(3 * PAGE_SIZE), np.uint8)
        cpu.write(base | C_BIT, before.tobytes())  # three bitmap pages of earlier bits
        gfns = np.array(gfn_list, np.int64)
        mem_encrypt.set_bitmap_bits(cpu, base, gfns, C_BIT)
        after = np.unpackbits(np.frombuffer(cpu.read(base | C_BIT, 3 * PAGE_SIZE), np.uint8),
                              bitorder="little")
        expected = np.unpackbits(before, bitorder="little")
        expected[gfns] = 1
        assert np.array_equal(after, expected)  # those bits set, every other bit as it was
        probe = np.array([7, 10, 32768, 32769, 65541, 65542, 98303], np.int64)
        assert mem_encrypt.bitmap_bits(cpu, base, probe, C_BIT).tolist() == [bool(b) for b in expected[probe]]
        assert mem_encrypt.bitmap_bits(cpu, base, np.array([], np.int64), C_BIT).tolist() == []
