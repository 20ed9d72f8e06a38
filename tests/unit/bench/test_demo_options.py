"""`confmig demo` refuses, before anything starts, options it could not run with, and says
what to change (the guest's own rules, asked up front)."""

from __future__ import annotations

import pytest

import confmig.bench.lab as lab_module
from confmig.bench.demo import DemoOptions
from confmig.bench.lab import largest_working_set
from confmig.common.errors import ConfigError
from confmig.common.units import GiB, MiB


def test_the_default_demo_is_accepted() -> None:
    assert DemoOptions().check() == 1 * GiB


def test_a_working_set_larger_than_the_guest_can_hold_names_the_largest_that_fits() -> None:
    # 256 MiB of RAM: 240 MiB above the firmware's and the Migration Handler's 16 MiB, less
    # the version table, is 239.5 MiB
    assert largest_working_set(256 * MiB) == 61320 * 4096
    with pytest.raises(ConfigError, match=r"--wss 256M does not fit a guest with --ram 256M: use --wss 239M"):
        DemoOptions(ram="256M").check()
    assert DemoOptions(ram="256M", wss="239M").check() == 256 * MiB
    assert DemoOptions(ram="256M", wss="all").check() == 256 * MiB


@pytest.mark.parametrize("options, message", [
    (DemoOptions(ram="lots"), r"--ram lots: invalid size"),
    (DemoOptions(ram="2M"), r"--ram 2M: .*minimum 4M"),
    (DemoOptions(wss="3K", ram="64M"), r"workload dirty: wss=3K is not a positive multiple of 4 KiB"),
    (DemoOptions(dirty_rate=-1), r"workload dirty: rate=-1 not in"),
    (DemoOptions(sev_es=True), r"--sev-es needs --mode psp"),
    (DemoOptions(channels=0), r"--channels 0: 1 to 255"),
    (DemoOptions(mode="psp", channels=2), r"the PSP path sends every page on the main channel"),
    (DemoOptions(mode="local", channels=2), r"--mode local sends no page at all"),
    (DemoOptions(downtime_limit=-5), r"--downtime-limit -5: 0 to 2000000 ms"),
    (DemoOptions(max_bandwidth=0), r"--max-bandwidth 0: at least 1 byte/s"),
    (DemoOptions(timeout=0), r"--timeout 0: a positive number of seconds"),
])  # fmt: skip
def test_options_the_demo_cannot_run_with_are_refused(options: DemoOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options.check()


@pytest.mark.parametrize("mode", ["psp", "mh", "local"])
def test_an_sev_es_guest_demos_every_confidential_mode(mode: str) -> None:
    assert DemoOptions(ram="256M", wss="64M", mode=mode, sev_es=True).check() == 256 * MiB


def test_guests_larger_than_this_machine_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_module, "_mem_available", lambda: 1 * GiB)
    with pytest.raises(ConfigError, match=r"--ram 1G --wss 256M needs about 1280 MiB .* 1024 MiB is avail"):
        DemoOptions().check()
    assert DemoOptions(ram="512M").check() == 512 * MiB
