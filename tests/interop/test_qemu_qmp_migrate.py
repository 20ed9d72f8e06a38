"""QEMU's own QMP client library drives a live migration between two real VMMs,
exactly as it would drive two QEMUs (capabilities, migrate, query-migrate, events)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from confmig.bench.lab import Lab, VmProc

TIMEOUT = 60.0
GUEST = "dirty,rate=2000,wss=16M,fill=random,prefill=on"
PREFILLED = re.compile(rb"dirty: working set written")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


def running_guest(lab: Lab) -> VmProc:
    vm = lab.vm("src", lab.host("hostA"), ram="128M", guest=GUEST)
    vm.wait_console(PREFILLED, timeout=TIMEOUT)
    return vm


async def connected(name: str, path: str) -> QMPClient:
    client = QMPClient(name)
    await client.connect(path)
    return client


async def next_event(listener: EventListener) -> Any:
    return await asyncio.wait_for(listener.get(), TIMEOUT)


async def next_status(listener: EventListener) -> str:
    event = await next_event(listener)
    assert event["event"] == "MIGRATION"
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    status: str = event["data"]["status"]
    return status


def test_qemu_qmp_client_drives_a_live_migration(lab: Lab) -> None:
    src_vm = running_guest(lab)
    dst_vm = lab.vm("dst", lab.host("hostB"), ram="128M", guest=GUEST, incoming="defer")
    events_on = {"capabilities": [{"capability": "events", "state": True}]}

    async def session() -> dict[str, Any]:
        src = await connected("src", src_vm.qmp_path)
        dst = await connected("dst", dst_vm.qmp_path)
        assert src.greeting is not None
        greeting: Any = src.greeting._asdict()
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7
        for client in (src, dst):
            await client.execute("migrate-set-capabilities", events_on)
            caps: Any = await client.execute("query-migrate-capabilities")
            assert {"capability": "events", "state": True} in caps

        with pytest.raises(ExecuteError) as caught:
            await src.execute("migrate")
        assert caught.value.error_class == "GenericError"
        assert str(caught.value) == "Parameter 'uri' is missing"

        with src.listen(src_events := EventListener(("MIGRATION",))), \
                dst.listen(dst_events := EventListener(("MIGRATION", "RESUME"))):
            await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            listening: Any = await dst.execute("query-migrate")
            address = listening["socket-address"][0]
            assert address["type"] == "inet"
            uri = f"tcp:{address['host']}:{address['port']}"

            assert await src.execute("migrate", {"uri": uri}) == {}
            seen = [await next_status(src_events)]
            while seen[-1] not in ("completed", "failed", "cancelled"):
                seen.append(await next_status(src_events))
            assert seen == ["setup", "active", "device", "completed"]
            info: Any = await src.execute("query-migrate")

            dst_seen: list[str] = []
            while "completed" not in dst_seen:
                event = await next_event(dst_events)
                dst_seen.append(event["data"]["status"] if event["event"] == "MIGRATION" else "RESUME")
            # As QEMU's process_incoming_migration_bh: the guest runs before "completed"
            # is announced, so whoever sees "completed" may use the VM at once.
            assert dst_seen == ["setup", "active", "RESUME", "completed"]

        assert await src.execute("query-status") == {
            "status": "postmigrate", "singlestep": False, "running": False}
        assert await dst.execute("query-status") == {
            "status": "running", "singlestep": False, "running": True}
        await src.disconnect()
        await dst.disconnect()
        result: dict[str, Any] = info
        return result

    info = asyncio.run(asyncio.wait_for(session(), TIMEOUT))

    assert info["status"] == "completed"
    assert info["ram"]["normal"] >= 4096  # the 16 MiB working set
    assert info["ram"]["transferred"] > info["ram"]["normal"] * 4096
    assert dst_vm.selfcheck(timeout=TIMEOUT).startswith("confmig-selfcheck: PASS")


@pytest.fixture
def event_loop_for_sync_client() -> Iterator[None]:
    """The legacy client runs the thread's current loop; give it one we close."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.mark.usefixtures("event_loop_for_sync_client")
def test_legacy_sync_client_queries_and_pauses_a_real_vm(lab: Lab) -> None:
    vm = running_guest(lab)
    monitor = QEMUMonitorProtocol(vm.qmp_path)
    try:
        greeting: Any = monitor.connect()
        assert greeting is not None and greeting["QMP"]["version"]["qemu"]["major"] == 7
        monitor.settimeout(TIMEOUT)
        assert monitor.cmd("query-status") == {"status": "running", "singlestep": False, "running": True}
        assert monitor.cmd("query-migrate") == {}

        monitor.cmd("stop")
        assert monitor.cmd("query-status") == {"status": "paused", "singlestep": False, "running": False}
        event: Any = monitor.pull_event(wait=TIMEOUT)
        assert event is not None and event["event"] == "STOP"
        monitor.cmd("cont")
        event = monitor.pull_event(wait=TIMEOUT)
        assert event is not None and event["event"] == "RESUME"
        status: Any = monitor.cmd("query-status")
        assert status["running"] is True
        assert monitor.cmd_obj({"execute": "migrate", "arguments": {"uri": "gopher:x"}, "id": "7"}) == {
            "error": {"class": "GenericError",
                      "desc": "Invalid migration URI 'gopher:x': unknown transport 'gopher'"},
            "id": "7",
        }
    finally:
        monitor.close()
    assert vm.selfcheck(timeout=TIMEOUT).startswith("confmig-selfcheck: PASS")


def test_qemu_qmp_client_drives_an_sev_migration_the_libvirt_way(lab: Lab) -> None:
    """libvirt's SEV migration, step by step: the target's certificates from its
    query-sev-capabilities into the source's migrate-set-parameters, then migrate."""
    import base64

    from confmig.bench.scenario import sev_args
    from confmig.platform.psp.identity import amd_chain

    sev = sev_args()
    src_vm = lab.vm("src", lab.host("hostA"), ram="64M", guest=GUEST, extra=sev)
    src_vm.wait_console(PREFILLED, timeout=TIMEOUT)
    dst_vm = lab.vm("dst", lab.host("hostB"), ram="64M", guest=GUEST, incoming="defer", extra=sev)

    async def session() -> Any:
        src = await connected("src", src_vm.qmp_path)
        dst = await connected("dst", dst_vm.qmp_path)
        assert (await src.execute("query-sev"))["state"] == "running"
        caps: Any = await dst.execute("query-sev-capabilities")
        await src.execute("migrate-set-parameters", {
            "sev-pdh": caps["pdh"], "sev-plat-cert": caps["cert-chain"],
            "sev-amd-cert": base64.b64encode(amd_chain(lab.amd_root)).decode()})
        params: Any = await src.execute("query-migrate-parameters")
        assert params["sev-pdh"] == caps["pdh"]
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        address = (await dst.execute("query-migrate"))["socket-address"][0]  # type: ignore[index]
        await src.execute("migrate", {"uri": f"tcp:{address['host']}:{address['port']}"})
        while (info := await src.execute("query-migrate"))["status"] not in (  # type: ignore[index]
                "completed", "failed", "cancelled"):
            await asyncio.sleep(0.05)
        assert (await dst.execute("query-sev"))["state"] == "running"
        await src.disconnect()
        await dst.disconnect()
        return info

    info = asyncio.run(asyncio.wait_for(session(), TIMEOUT))
    assert info["status"] == "completed", info.get("error-desc")
    assert info["x-confmig"]["confidential"]["private-pages"] >= 4096
    assert dst_vm.selfcheck(timeout=TIMEOUT).startswith("confmig-selfcheck: PASS")
