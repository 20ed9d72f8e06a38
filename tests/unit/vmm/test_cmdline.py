from __future__ import annotations

import pytest

from confmig.common.errors import ConfigError
from confmig.vmm.cmdline import parse, parse_opts

HOST = ["--host", "/run/h.sock"]


def test_qemu_shaped_command_line() -> None:
    c = parse([*HOST, "-m", "1G", "-smp", "2", "-name", "guest=vm1", "--guest", "dirty,rate=10,wss=8M",
               "-qmp", "unix:/tmp/q.sock,server=on,wait=off", "-incoming", "defer",
               "-fw_cfg", "name=opt/x,string=a,,b", "-S"])
    assert c.ram_size == 1 << 30 and c.smp == 2 and c.name == "vm1"
    assert c.guest.kernel_cmdline() == "workload=dirty rate=10 wss=8M"
    assert c.qmp[0].path == "/tmp/q.sock" and c.incoming == "defer" and c.start_paused
    assert c.fw_cfg_files == {"opt/x": b"a,b"}


def test_m_defaults_to_mebibytes_like_qemu() -> None:
    assert parse([*HOST, "-m", "512"]).ram_size == 512 << 20


@pytest.mark.parametrize("argv, message", [
    ([], "--host"),
    ([*HOST, "-m", "lots"], "-m"),
    ([*HOST, "-m", "1K"], "too small"),
    ([*HOST, "--guest", "bitcoin"], "unknown workload"),
    ([*HOST, "-qmp", "stdio"], "-qmp"),
    ([*HOST, "-frobnicate"], "not a valid option"),
    ([*HOST, "-m"], "requires an argument"),
    ([*HOST, "-fw_cfg", "name=etc/x,string=1"], "opt/"),
    ([*HOST, "-smp", "0"], "-smp"),
    ([*HOST, "-cpu", "pentium"], "unknown model"),
    ([*HOST, "-cpu", "host,+avx512"], "unknown feature 'avx512'"),
    ([*HOST, "-cpu", "host,kvm-migration-control=maybe"], "not on/off"),
])
def test_bad_command_lines_are_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_cpu_hides_kvm_pv_features_qemu_style() -> None:
    assert parse(HOST).cpu.kvm_feature("kvm-migration-control")
    hidden = parse([*HOST, "-cpu", "EPYC,-kvm-migration-control"]).cpu
    assert hidden.model == "EPYC" and not hidden.kvm_feature("kvm-migration-control")
    assert hidden.kvm_feature("kvm-hc-map-gpa-range")
    both = parse([*HOST, "-cpu",
                   "host,kvm-hc-map-gpa-range=off,kvm-migration-control=off,+kvm-migration-control"])
    assert both.cpu.kvm_features_off == {"kvm-hc-map-gpa-range"}


def test_opts_escaping_and_implied_key() -> None:
    assert parse_opts("q35,a=1,b=x,,y", "type") == {"type": "q35", "a": "1", "b": "x,y"}
    with pytest.raises(ConfigError):
        parse_opts("a=1,a=2")


def test_sev_guest_object() -> None:
    c = parse([*HOST, "-object", "sev-guest,id=sev0,policy=0x5,cbitpos=51,reduced-phys-bits=1",
               "-machine", "q35,confidential-guest-support=sev0"])
    assert c.sev is not None and c.sev.policy == 5 and c.sev.es


@pytest.mark.parametrize("obj, message", [
    ("sev-guest,id=sev0,cbitpos=47", "cbitpos check failed"),
    ("sev-guest,id=sev0,reduced-phys-bits=5", "reduced_phys_bits"),
    ("sev-guest,id=sev0,policy=zzz", "sev-guest"),
    ("sev-guest,id=sev0,colour=red", "unknown property"),
])
def test_bad_sev_guest_objects(obj: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse([*HOST, "-object", obj, "-machine", "confidential-guest-support=sev0"])


def test_confidential_guest_support_needs_its_object() -> None:
    with pytest.raises(ConfigError, match="no object"):
        parse([*HOST, "-machine", "confidential-guest-support=sev9"])


CPR = '{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/run/cpr.sock"}}'


def test_a_second_incoming_is_qemus_cpr_channel() -> None:
    c = parse(["--host", "h", "-incoming", "unix:/run/main.sock", "-incoming", CPR])
    assert (c.incoming, c.cpr_incoming) == ("unix:/run/main.sock", "unix:/run/cpr.sock")
    with pytest.raises(ConfigError, match="a cpr channel needs a main channel too"):
        parse(["--host", "h", "-incoming", CPR])
    with pytest.raises(ConfigError, match="-incoming defer with a cpr channel is not supported"):
        parse(["--host", "h", "-incoming", "defer", "-incoming", CPR])
    with pytest.raises(ConfigError, match="a second main channel"):
        parse(["--host", "h", "-incoming", "defer", "-incoming", "unix:/x"])
