"""The VMM's QMP commands, with QEMU's names, arguments and replies."""

from __future__ import annotations

import base64
from collections.abc import Callable

from confmig.common.errors import ConfigError
from confmig.vmm import sev
from confmig.vmm.machine import Machine
from confmig.vmm.migration.cpr import parse_channel
from confmig.vmm.migration.state import MigrationState
from confmig.vmm.qmp.schema import Arg, Array, QmpError, QmpRegistry, Struct
from confmig.vmm.runstate import RunState

MIGRATION_PARAMETERS = {
    "downtime-limit": Arg(int, optional=True),
    "max-bandwidth": Arg(int, optional=True),
    "avail-switchover-bandwidth": Arg(int, optional=True),
    "multifd-channels": Arg(int, optional=True),
    "multifd-compression": Arg(str, optional=True),
    "sev-pdh": Arg(str, optional=True),
    "sev-plat-cert": Arg(str, optional=True),
    "sev-amd-cert": Arg(str, optional=True),
    "x-confidential-backend": Arg(str, optional=True),
    "x-mh-target-challenge": Arg(str, optional=True),
    "mode": Arg(str, optional=True),
}


def register(
    registry: QmpRegistry,
    machine: Machine,
    migration: MigrationState,
    request_quit: Callable[[], None],
) -> None:
    r = registry

    @r.command("query-status")
    def query_status(_a: dict[str, object]) -> object:
        state = machine.runstate
        return {"status": state.value, "singlestep": False, "running": state == RunState.RUNNING}

    @r.command("query-name")
    def query_name(_a: dict[str, object]) -> object:
        return {"name": machine.config.name}

    @r.command("query-kvm")
    def query_kvm(_a: dict[str, object]) -> object:
        return {"enabled": True, "present": True}

    @r.command("query-cpus-fast")
    def query_cpus_fast(_a: dict[str, object]) -> object:
        return [
            {
                "cpu-index": v.fd.vcpu_id,
                "qom-path": f"/machine/unattached/device[{v.fd.vcpu_id}]",
                "thread-id": v.native_id or 0,
                "target": "x86_64",
            }
            for v in machine.vcpus
        ]

    @r.command("stop")
    def stop(_a: dict[str, object]) -> None:
        if machine.runstate == RunState.INMIGRATE:
            machine.autostart = False  # as QEMU: the target stays paused after loading
            return
        if machine.runstate == RunState.RUNNING:
            machine.stop(RunState.PAUSED)

    @r.command("cont")
    def cont(_a: dict[str, object]) -> None:
        if machine.runstate == RunState.INMIGRATE:
            raise QmpError("Migration is not finalized yet")
        machine.start()

    @r.command("quit")
    def quit_(_a: dict[str, object]) -> None:
        request_quit()

    @r.command("inject-nmi")
    def inject_nmi(_a: dict[str, object]) -> None:
        # As QEMU: a paused VM's vCPUs hold the NMI pending and take it when they run again
        # (here not across a migration or a saved state: the vCPU state does not carry it).
        if machine.runstate not in (RunState.RUNNING, RunState.PAUSED):
            raise QmpError(f"cannot inject an NMI into a VM that is {machine.runstate}")
        if (away := machine.migrated_away()) is not None:
            raise QmpError(f"cannot inject an NMI: the guest left this VMM ({away})")
        machine.inject_nmi()

    @r.command(
        "migrate",
        args={
            "uri": Arg(str, optional=True),
            "channels": Arg(Array(Struct({"channel-type": Arg(str), "addr": Arg(object)})), optional=True),
            "detach": Arg(bool, optional=True),
            "resume": Arg(bool, optional=True),
        },
    )
    def migrate(a: dict[str, object]) -> None:
        if a.get("resume"):
            raise QmpError("Postcopy recovery ('resume') is not supported")
        main, cpr = _migrate_channels(a.get("uri"), a.get("channels"))
        migration.migrate(main, cpr_uri=cpr)

    @r.command(
        "migrate-incoming", args={"uri": Arg(str), "exit-on-error": Arg(bool, optional=True)}
    )
    def migrate_incoming(a: dict[str, object]) -> None:
        migration.migrate_incoming(str(a["uri"]))

    @r.command("start-migration-handler")
    def start_migration_handler(_a: dict[str, object]) -> None:
        migration.start_migration_handler()

    @r.command("x-query-migration-handler")
    def query_migration_handler(_a: dict[str, object]) -> object:
        if machine.mh is None:
            raise QmpError("This guest has no Migration Handler vCPUs (-smp N,mirrorvcpus=M)")
        return machine.mh.query(target=machine.config.mh_target)

    @r.command("start-migrate-incoming", args={"uri": Arg(str)})
    def start_migrate_incoming(a: dict[str, object]) -> None:
        migration.migrate_incoming(str(a["uri"]))

    @r.command("migrate_cancel")
    def migrate_cancel(_a: dict[str, object]) -> None:
        migration.cancel()

    @r.command("query-migrate")
    def query_migrate(_a: dict[str, object]) -> object:
        info = migration.query()
        inc = migration.incoming
        if inc is not None and not migration.status.finished:
            info["socket-address"] = _socket_address(inc.address)
        return info

    @r.command(
        "migrate-set-capabilities",
        args={"capabilities": Arg(Array(Struct({"capability": Arg(str), "state": Arg(bool)})))},
    )
    def set_caps(a: dict[str, object]) -> None:
        caps = a["capabilities"]
        assert isinstance(caps, list)
        migration.set_capabilities([(str(c["capability"]), bool(c["state"])) for c in caps])

    @r.command("query-migrate-capabilities")
    def query_caps(_a: dict[str, object]) -> object:
        return migration.params.qmp_capabilities()

    @r.command("migrate-set-parameters", args=MIGRATION_PARAMETERS)
    def set_params(a: dict[str, object]) -> None:
        migration.set_parameters(a)

    @r.command("query-sev")
    def query_sev(_a: dict[str, object]) -> object:
        if machine.sev is None:
            raise QmpError("SEV feature is not available")
        return machine.sev.query()

    @r.command("x-query-sev-shared-regions")
    def query_sev_shared_regions(_a: dict[str, object]) -> object:
        """confmig's: the pages the guest reported shared (KVM_HC_MAP_GPA_RANGE), as GPA ranges."""
        if machine.sev is None:
            raise QmpError("SEV feature is not available")
        return [{"start": gfn << 12, "size": npages << 12} for gfn, npages in machine.sev.shared.ranges()]

    @r.command("query-sev-launch-measure")
    def query_sev_launch_measure(_a: dict[str, object]) -> object:
        if machine.sev is None or not machine.sev.measurement:
            raise QmpError("SEV launch measurement is not available")
        return {"data": base64.b64encode(machine.sev.measurement).decode()}

    @r.command("query-sev-capabilities")
    def query_sev_capabilities(_a: dict[str, object]) -> object:
        return sev.query_sev_capabilities(machine.kvm)

    @r.command("query-migrate-parameters")
    def query_params(_a: dict[str, object]) -> object:
        return migration.params.qmp_parameters()


def _migrate_channels(uri: object, channels: object) -> tuple[str, str | None]:
    """``migrate``'s ``uri`` or ``channels`` (QEMU 8.1+; a ``cpr`` channel with QEMU 10's
    ``cpr-transfer``) as (main URI, cpr URI)."""
    if uri is None and channels is None:
        # The QEMU we speak (7.2, the greeting's) has 'uri' mandatory and says so; 'channels'
        # is an extension from QEMU 8.1 and 10 (whose words for this are "need either 'uri'
        # or 'channels' argument").
        raise QmpError("Parameter 'uri' is missing")
    if uri is not None and channels is not None:
        raise QmpError("need either 'uri' or 'channels' argument")  # QEMU 8.1+'s words
    if uri is not None:
        return str(uri), None
    assert isinstance(channels, list)
    found: dict[str, str] = {}
    for spec in channels:
        assert isinstance(spec, dict)
        try:
            ctype, where = parse_channel(spec)
        except ConfigError as exc:
            raise QmpError(str(exc)) from None
        if ctype in found:
            raise QmpError(f"Channel list has more than one {ctype} entry")
        found[ctype] = where
    if "main" not in found:
        raise QmpError("Channel list has no main entry")
    return found["main"], found.get("cpr")


def _socket_address(address: str) -> list[dict[str, str]]:
    """QEMU's ``SocketAddress`` list for the listening incoming side."""
    scheme, _, rest = address.partition(":")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        return [{"type": "inet", "host": host, "port": port}]
    if scheme == "unix":
        return [{"type": "unix", "path": rest}]
    return []
