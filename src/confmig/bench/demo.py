"""``confmig demo``: the embedded default — two hosts, a running guest, one live migration."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from confmig.bench.deadline import DEMO_TIMEOUT, Deadline
from confmig.bench.lab import (
    WORKING_SET_WRITTEN,
    WORKLOAD_STARTED,
    Lab,
    VmProc,
    VmSpec,
    check_host_memory,
    check_vm,
    largest_working_set,
    size_option,
)
from confmig.bench.local import hand_over
from confmig.bench.scenario import (
    MH_TARGET_READY,
    SEV_ES_POLICY,
    SEV_POLICY,
    MigrationSettings,
    mh_guest_args,
    migrate,
    sev_args,
)
from confmig.common.errors import ConfigError
from confmig.common.units import parse_size
from confmig.owner import DISK_PASSPHRASE_GUID
from confmig.vmm.cmdline import MAX_MIRROR_VCPUS
from confmig.vmm.migration.params import MAX_DOWNTIME_LIMIT_MS, MAX_MULTIFD_CHANNELS

GUEST_READY_TIMEOUT = 600.0
"""Seconds for the guest to boot and get ready (writing 4 GiB of random pages takes minutes)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    ram: str = "1G"
    guest: str = "dirty"
    dirty_rate: int = 2000
    wss: str = "256M"
    downtime_limit: int = 300
    max_bandwidth: int = 100 << 30
    channels: int = 1
    mode: str = "plain"
    """``plain`` (an ordinary guest), ``psp`` (an SEV guest, pages re-encrypted by the PSP),
    ``mh`` (an SEV guest, pages sealed by its own Migration Handler) or ``local`` (an SEV guest
    handed to a new VMM process on the same host: ``cpr-transfer``, nothing of its RAM copied)."""
    mh_vcpus: int = 1
    """With ``mh``: the guest's Migration Handler vCPUs."""
    sev_es: bool = False
    keep: bool = False
    timeout: float = DEMO_TIMEOUT
    """Seconds for the whole demo."""

    def guest_arg(self) -> str:
        if self.guest == "dirty":
            return f"dirty,rate={self.dirty_rate},wss={self.wss},fill=random,prefill=on"
        return self.guest

    def check(self) -> int:
        """Refuse, before anything starts and saying what to change, options the demo could
        not run with; return the guest's RAM size in bytes."""
        if self.sev_es and self.mode not in ("psp", "mh", "local"):
            raise ConfigError("--sev-es needs --mode psp, mh or local (an SEV-ES guest is an SEV guest)")
        if not 1 <= self.channels <= MAX_MULTIFD_CHANNELS:
            raise ConfigError(f"--channels {self.channels}: 1 to {MAX_MULTIFD_CHANNELS}")
        if self.mode == "local" and self.channels > 1:
            raise ConfigError("--channels: --mode local sends no page at all (the new VMM maps the "
                              "guest's RAM); leave --channels at 1")
        if self.mode in ("psp", "mh") and self.channels > 1:
            raise ConfigError(f"--channels: the {self.mode.upper()} path sends every page on the main "
                              f"channel (multifd is for plain guests); leave --channels at 1 with --mode "
                              f"{self.mode}" + (" and use --mh-vcpus" if self.mode == "mh" else ""))
        if not 1 <= self.mh_vcpus <= MAX_MIRROR_VCPUS:
            raise ConfigError(f"--mh-vcpus {self.mh_vcpus}: 1 to {MAX_MIRROR_VCPUS}")
        if not 0 <= self.downtime_limit <= MAX_DOWNTIME_LIMIT_MS:
            raise ConfigError(f"--downtime-limit {self.downtime_limit}: 0 to {MAX_DOWNTIME_LIMIT_MS} ms")
        if self.max_bandwidth < 1:
            raise ConfigError(f"--max-bandwidth {self.max_bandwidth}: at least 1 byte/s")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout {self.timeout:g}: a positive number of seconds")
        try:
            ram_size = check_vm(self.ram, "idle").ram_size
        except ConfigError as exc:
            raise ConfigError(f"--ram {self.ram}: {str(exc).removeprefix('-m: ')}") from None
        touched = 0
        if self.guest == "dirty":
            most = largest_working_set(ram_size)
            try:
                touched = most if self.wss == "all" else parse_size(self.wss)
            except ValueError as exc:
                raise ConfigError(f"--wss {self.wss}: {exc}") from None
            if touched > most:
                raise ConfigError(f"--wss {self.wss} does not fit a guest with --ram {self.ram}: use --wss "
                                  f"{size_option(most)} or less (or --wss all), or a larger --ram")
        check_vm(self.ram, self.guest_arg())
        # The target preallocates all its RAM (a local one shares the source's); the source
        # writes its working set.
        check_host_memory((0 if self.mode == "local" else ram_size) + touched,
                          f"--ram {self.ram}" + (f" --wss {self.wss}" if touched else ""))
        return ram_size


def _pair(lab: Lab, opts: DemoOptions, audit: Callable[[Mapping[str, object]], None]
          ) -> tuple[VmProc, VmProc]:
    """The source on hostA, running, and its target on hostB, waiting (-incoming defer); all
    four started side by side. An SEV source is launched with its owner's attestation (the
    owner runs in this process and releases a disk key only to the expected firmware)."""
    a, b = lab.start_hosts("hostA", "hostB")
    src_extra: list[str] = []
    dst_extra: list[str] = []
    incoming: str | None = "defer"
    if opts.mode == "mh":
        # Both launches are attested by the owner, who gives both the same transport key;
        # the target then runs only its Migration Handler (no -incoming: it boots first).
        source, target = mh_guest_args(lab, opts.mh_vcpus, audit=audit,
                                       secrets=((DISK_PASSPHRASE_GUID, os.urandom(32)),),
                                       policy=SEV_ES_POLICY if opts.sev_es else SEV_POLICY)
        src_extra += source
        dst_extra += target
        incoming = None
    elif opts.mode == "psp":
        policy = SEV_ES_POLICY if opts.sev_es else SEV_POLICY
        owner = lab.owner(firmware=lab.bios, policy=policy, audit=audit,
                          secrets=[(DISK_PASSPHRASE_GUID, os.urandom(32))])
        src_extra += sev_args(policy, owner=owner.url)
        dst_extra += sev_args(policy)
    if opts.guest == "kv":
        src_extra += lab.kv_device("src")
        dst_extra += lab.kv_device("dst")
    src, dst = lab.start_vms(
        VmSpec(name="src", host=a, ram=opts.ram, guest=opts.guest_arg(), extra=tuple(src_extra)),
        VmSpec(name="dst", host=b, ram=opts.ram, guest=opts.guest_arg(), incoming=incoming,
               extra=tuple(dst_extra)))
    return src, dst


def run_demo(opts: DemoOptions, *, as_json: bool = False) -> bool:
    """Run the demo; False if the migration or the guest's self-check failed. A guest that
    halts or faults, or a step that outlives its bound, raises instead (a ConfmigError)."""
    total = opts.check()
    console = Console(stderr=as_json, quiet=False)
    if opts.mode == "local":
        return _run_local(opts, console, as_json=as_json)
    confidential = opts.mode in ("psp", "mh")
    with Lab(keep=opts.keep, deadline=Deadline(opts.timeout)) as lab:
        settings = MigrationSettings(downtime_limit_ms=opts.downtime_limit,
                                     max_bandwidth=opts.max_bandwidth, channels=opts.channels,
                                     sev_target_certs=opts.mode == "psp", amd_root=lab.amd_root,
                                     confidential_backend=opts.mode if confidential else "")
        console.print(f"[bold]confmig demo[/]: two emulated hosts in {lab.root}")
        verdicts: list[Mapping[str, object]] = []
        src, dst = _pair(lab, opts, verdicts.append)
        if confidential:
            console.print("guest owner (in this process) attested the source's launch: "
                          + ", ".join(str(v["event"]) for v in verdicts))
        kind = {"psp": f"{'SEV-ES' if opts.sev_es else 'SEV'} guest (PSP migration)",
                "mh": f"{'SEV-ES' if opts.sev_es else 'SEV'} guest (Migration Handler migration, "
                      f"{opts.mh_vcpus} MH vCPU)",
                }.get(opts.mode, "guest")
        waiting = ("running only its Migration Handler" if opts.mode == "mh" else "waiting (-incoming defer)")
        console.print(f"source {kind} on hostA ({opts.ram}, workload: {opts.guest_arg()}); "
                      f"target on hostB {waiting}")
        filling = " and filling its working set" if opts.guest == "dirty" else ""
        with console.status(f"booting the guest{filling}..."):
            ready = WORKING_SET_WRITTEN if opts.guest == "dirty" else WORKLOAD_STARTED[opts.guest]
            src.wait_console(ready, timeout=GUEST_READY_TIMEOUT)
            if opts.mode == "mh":
                dst.wait_console(MH_TARGET_READY, timeout=GUEST_READY_TIMEOUT)
        with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task("migrating", total=total, detail="setup")

            def progress(info: dict[str, Any]) -> None:
                ram = info.get("ram", {})
                done = ram.get("transferred", 0)
                bar.update(task, completed=min(done, total), detail=(
                    f"{info.get('status')}  pass {ram.get('dirty-sync-count', 0)}  "
                    f"{ram.get('mbps', 0):.0f} Mbit/s  remaining {ram.get('remaining', 0) >> 20} MiB"))

            result = migrate(src, dst, settings=settings, progress=progress)
            bar.update(task, completed=total, detail=result.status)
        src.check_alive()  # a guest that halted while it moved says so on the source's console
        verdict = ""
        if result.status == "completed":
            with console.status("in-guest self-check on the target..."):
                verdict = dst.selfcheck()
        ok = result.status == "completed" and "PASS" in verdict
        summary = _summary(result.info, result.wall_s, verdict, opts)
        if not ok:  # what the guest said last is where a failure shows
            summary["console-tail"] = (dst if result.status == "completed" else src).console_tail()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print(console, summary)
    return ok


def _run_local(opts: DemoOptions, console: Console, *, as_json: bool) -> bool:
    """``--mode local``: one host, an attested SEV (or SEV-ES) guest running under one VMM
    process; a new VMM process (think: an upgraded QEMU) takes it over (cpr-transfer)."""
    with Lab(keep=opts.keep, deadline=Deadline(opts.timeout)) as lab:
        console.print(f"[bold]confmig demo --mode local[/]: one emulated host in {lab.root}")
        host = lab.host("hostA")
        verdicts: list[Mapping[str, object]] = []
        policy = SEV_ES_POLICY if opts.sev_es else SEV_POLICY
        owner = lab.owner(firmware=lab.bios, policy=policy, audit=verdicts.append,
                          secrets=[(DISK_PASSPHRASE_GUID, os.urandom(32))])
        extra = (*sev_args(policy, owner=owner.url), *(lab.kv_device("old") if opts.guest == "kv" else ()))
        spec = VmSpec(name="old", host=host, ram=opts.ram, guest=opts.guest_arg(), extra=extra)
        old = lab.start_vms(spec)[0]
        kind = "SEV-ES" if opts.sev_es else "SEV"
        console.print(f"{kind} guest on hostA under VMM process {old.proc.pid} ({opts.ram}, workload: "
                      f"{opts.guest_arg()}); the owner attested its launch: "
                      + ", ".join(str(v["event"]) for v in verdicts))
        with console.status("booting the guest" + (" and filling its working set..." if opts.guest == "dirty"
                                                   else "...")):
            ready = WORKING_SET_WRITTEN if opts.guest == "dirty" else WORKLOAD_STARTED[opts.guest]
            old.wait_console(ready, timeout=GUEST_READY_TIMEOUT)
        new_extra = (*sev_args(policy, owner=owner.url),
                     *(lab.kv_device("new") if opts.guest == "kv" else ()))
        with console.status("starting a new VMM process and handing the guest over (cpr-transfer)..."):
            new, result = hand_over(lab, old, replace(spec, name="new", extra=new_extra))
        old.check_alive()
        verdict = ""
        if result.status == "completed" and new is not None:
            console.print(f"the guest now runs under VMM process {new.proc.pid}; the old one is "
                          f"{old.qmp.execute('query-status')['status']}")
            with console.status("in-guest self-check under the new VMM..."):
                verdict = new.selfcheck()
        ok = result.status == "completed" and "PASS" in verdict
        summary = _summary(result.info, result.wall_s, verdict, opts)
        if not ok:
            summary["console-tail"] = (new if new is not None and result.status == "completed"
                                       else old).console_tail()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print(console, summary)
    return ok


def _summary(info: dict[str, Any], wall_s: float, verdict: str, opts: DemoOptions) -> dict[str, Any]:
    ram = info.get("ram", {})
    total_ms = info.get("total-time", 0)
    extra = info.get("x-confmig", {})
    return {
        "options": asdict(opts),
        "status": info.get("status"),
        "error": info.get("error-desc"),
        "total-time-ms": total_ms,
        "downtime-ms": info.get("downtime"),
        "setup-time-ms": info.get("setup-time"),
        "transferred-bytes": ram.get("transferred"),
        "throughput-MBps": round(ram.get("transferred", 0) / (total_ms / 1000) / 1e6, 1) if total_ms else 0,
        "rounds": extra.get("rounds"),
        "dirty-sync-count": ram.get("dirty-sync-count"),
        "pages": {"normal": ram.get("normal"), "zero": ram.get("duplicate")},
        "downtime-breakdown-ms": extra.get("downtime-breakdown-ms"),
        "confidential": extra.get("confidential"),
        # every byte the source wrote: the stream, and a local migration's cpr channel
        "bytes-sent": ram.get("transferred", 0) + (extra.get("confidential") or {}).get("cpr-bytes", 0),
        "selfcheck": verdict or None,
        "wall-s": round(wall_s, 3),
    }


def _print(console: Console, s: dict[str, Any]) -> None:
    local = s["options"]["mode"] == "local"
    t = Table(title="intra-host hand-over (cpr-transfer)" if local else "live migration", show_header=False)
    t.add_column("metric", style="bold")
    t.add_column("value")
    rows = [
        ("status", s["status"] + (f" ({s['error']})" if s.get("error") else "")),
        ("total time", f"{s['total-time-ms']} ms"),
        ("downtime", f"{s['downtime-ms']} ms"),
        ("setup time", f"{s['setup-time-ms']} ms"),
        ("transferred", f"{(s['transferred-bytes'] or 0) / 1e6:.1f} MB"),
        ("throughput", f"{s['throughput-MBps']} MB/s"),
        ("rounds", str(s["rounds"])),
        ("pages: normal / zero", f"{s['pages']['normal']} / {s['pages']['zero']}"),
    ]
    if s.get("downtime-breakdown-ms"):
        rows.append(("downtime breakdown", ", ".join(
            f"{k} {v:.1f} ms" for k, v in s["downtime-breakdown-ms"].items())))
    if s.get("confidential"):
        c = s["confidential"]
        if c["backend"] == "mh":
            detail = (f"{c['mh-commands']} MH commands, {c['batches']} batches, "
                      f"{c['zero-pages-elided']} zero pages elided, {c['mh-vcpus']} MH vCPUs")
        elif c["backend"] == "local":
            detail = (f"{c['psp-commands']} PSP commands; RAM by file descriptor: {c['fds-passed']} fds, "
                      f"{c['cpr-bytes']} bytes on the cpr channel")
            rows.append(("bytes sent (stream + cpr)", f"{s['bytes-sent']} bytes"))
        else:
            detail = f"{c['psp-commands']} PSP commands"
        rows.append((f"confidential ({c['backend']})",
                     f"{c['private-pages']} private pages, {c['shared-pages']} shared pages, {detail}"))
    if s.get("selfcheck"):
        rows.append(("guest self-check", s["selfcheck"]))
    if s.get("console-tail"):
        rows.append(("guest console (last lines)", s["console-tail"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
