"""``confmig``: the command-line front end. Thin: each command calls one module."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

import click

from confmig.bench.deadline import BENCH_TIMEOUT, DEMO_TIMEOUT, LAUNCH_TIMEOUT
from confmig.common.errors import ConfmigError
from confmig.common.pdeathsig import adopt_parent_from_environment


class _Commands(click.Group):
    """Loads the ``owner`` group only when it is asked for: it brings ``cryptography``,
    which the VMM's process (``confmig vm``) must never load."""

    OWNER = "owner"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), self.OWNER])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == self.OWNER:
            from confmig.owner.cli import owner

            return owner
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Live migration of confidential VMs: emulated SEV hosts, a QEMU-like VMM."""
    adopt_parent_from_environment()  # a lab's host or VMM ends with the lab


def _run_scenario(run: Callable[[], bool]) -> None:
    """Run a scenario that starts processes (demo, launch, bench): a signal or an error
    unwinds through its labs, which stop everything they started; exit non-zero unless
    it succeeded."""
    from confmig.bench.lab import Interrupted, signals_unwind

    try:
        with signals_unwind():
            ok = run()
    except Interrupted as exc:
        click.echo(f"confmig: {exc}; every process it started is stopped", err=True)
        sys.exit(128 + exc.signum)
    except (ConfmigError, OSError) as exc:  # OSError: a peer (a VMM's QMP) stopped answering
        raise click.ClickException(str(exc) or type(exc).__name__) from None
    sys.exit(0 if ok else 1)


_TIMEOUT = click.FloatRange(min=0, min_open=True)

@cli.command()
@click.option("--socket", "socket_path", required=True, help="Unix socket to serve /dev/kvm on.")
@click.option("--state-dir", default=None, help="Where the host keeps its identity (PSP keys).")
@click.option("--amd-root", default=None,
              help="The installation's emulated AMD root (default: shared by all hosts of this user).")
@click.option("--psp-latency-us", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="PSP cost model (an assumption): microseconds added to every PSP command.")
@click.option("--psp-bandwidth-mbps", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="PSP cost model (an assumption): MB/s of guest data through the PSP (0: unlimited).")
def host(socket_path: str, state_dir: str | None, amd_root: str | None, psp_latency_us: float,
         psp_bandwidth_mbps: float) -> None:
    """Run one emulated host: the KVM kernel and the silicon."""
    from confmig.hostd.main import serve
    from confmig.platform.psp.cost import PspCostModel

    logging.basicConfig(level=os.environ.get("CONFMIG_LOG", "WARNING"),
                        format="%(asctime)s host[%(process)d] %(levelname)s %(message)s")
    try:
        serve(socket_path, state_dir, amd_root=amd_root,
              psp_cost=PspCostModel(command_latency=psp_latency_us / 1e6, bandwidth=psp_bandwidth_mbps * 1e6))
    except OSError as exc:
        raise click.ClickException(f"cannot serve {socket_path}: {exc.strerror or exc}") from None
    except ConfmigError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False,
                               "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def vm(args: tuple[str, ...]) -> None:
    """Run one VMM (QEMU's command-line shape; see 'confmig vm -h')."""
    from confmig.bench.firmware import with_default_bios
    from confmig.vmm import cmdline
    from confmig.vmm.main import main as vm_main

    if args and args[0] in ("-h", "--help", "-help"):
        click.echo(cmdline.USAGE)
        return
    try:
        argv = with_default_bios(list(args))
    except ConfmigError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(vm_main(argv))


@cli.command()
@click.option("--sev-es", is_flag=True, help="An SEV-ES guest (policy 0x5) instead of SEV (0x1).")
@click.option("--ram", default="256M", show_default=True, help="Guest RAM.")
@click.option("--guest", default="idle", show_default=True,
              type=click.Choice(["dirty", "idle", "kv"]), help="Guest workload.")
@click.option("--wrong-firmware", is_flag=True,
              help="The owner expects another firmware image: the launch gets no secret.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--keep", is_flag=True, help="Keep the lab directory (logs, consoles).")
@click.option("--timeout", default=LAUNCH_TIMEOUT, show_default=True, type=_TIMEOUT,
              help="Seconds for the whole launch; past them it stops with an error.")
def launch(sev_es: bool, ram: str, guest: str, wrong_firmware: bool, as_json: bool, keep: bool,
           timeout: float) -> None:
    """An attested SEV launch: host, guest owner, VMM; the owner checks the measurement, then provisions."""
    from confmig.bench.launch import LaunchOptions, run_launch

    opts = LaunchOptions(sev_es=sev_es, ram=ram, guest=guest, wrong_firmware=wrong_firmware, keep=keep,
                         timeout=timeout)
    _run_scenario(lambda: run_launch(opts, as_json=as_json))


@cli.command("amd-certs")
@click.option("--amd-root", default=None, help="The AMD root directory (default: this installation's).")
def amd_certs(amd_root: str | None) -> None:
    """Print ASK || ARK in base64: the 'sev-amd-cert' migration parameter of an SEV guest."""
    import base64
    from pathlib import Path

    from confmig.common.paths import default_amd_root
    from confmig.platform.psp.identity import amd_chain

    root = Path(amd_root) if amd_root else default_amd_root()
    try:
        click.echo(base64.b64encode(amd_chain(root)).decode())
    except (ConfmigError, OSError, ValueError, KeyError) as exc:
        raise click.ClickException(f"cannot read the AMD root in {root}: {exc}") from None


@cli.command()
def firmware() -> None:
    """Print the path of the built-in firmware image (what 'confmig vm' loads without -bios)."""
    from confmig.bench.firmware import default_bios

    click.echo(default_bios())


@cli.command()
@click.option("--ram", default="1G", show_default=True, help="Guest RAM.")
@click.option("--guest", default="dirty", show_default=True,
              type=click.Choice(["dirty", "idle", "kv"]), help="Guest workload.")
@click.option("--dirty-rate", default=2000, show_default=True,
              help="Pages per second the dirty workload writes.")
@click.option("--wss", default="256M", show_default=True, help="Working set of the dirty workload.")
@click.option("--downtime-limit", default=300, show_default=True, help="Milliseconds.")
@click.option("--max-bandwidth", default=100 << 30, show_default=True, help="Bytes per second.")
@click.option("--channels", default=1, show_default=True, help="1 = main channel; >1 = multifd.")
@click.option("--mode", default="plain", show_default=True,
              type=click.Choice(["plain", "psp", "mh", "local"]),
              help="plain: an ordinary guest; psp: an SEV guest, its private pages re-encrypted by the "
                   "PSP; mh: an SEV guest, its private pages sealed by its own Migration Handler; "
                   "local: an SEV guest handed to a new VMM process on the same host (cpr-transfer: "
                   "its RAM by file descriptor, its context moved by KVM, no page copied).")
@click.option("--mh-vcpus", default=1, show_default=True, help="With --mode mh: Migration Handler vCPUs.")
@click.option("--sev-es", is_flag=True, help="With --mode psp, mh or local: an SEV-ES guest.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--keep", is_flag=True, help="Keep the lab directory (logs, consoles).")
@click.option("--timeout", default=DEMO_TIMEOUT, show_default=True, type=_TIMEOUT,
              help="Seconds for the whole demo; past them it stops with an error.")
def demo(ram: str, guest: str, dirty_rate: int, wss: str, downtime_limit: int, max_bandwidth: int,
         channels: int, mode: str, mh_vcpus: int, sev_es: bool, as_json: bool, keep: bool,
         timeout: float) -> None:
    """Start two hosts and two VMs here, live-migrate the running guest, report."""
    from confmig.bench.demo import DemoOptions, run_demo

    opts = DemoOptions(ram=ram, guest=guest, dirty_rate=dirty_rate, wss=wss,
                       downtime_limit=downtime_limit, max_bandwidth=max_bandwidth,
                       channels=channels, mode=mode, mh_vcpus=mh_vcpus, sev_es=sev_es, keep=keep,
                       timeout=timeout)
    _run_scenario(lambda: run_demo(opts, as_json=as_json))


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def analyze(path: str, as_json: bool) -> None:
    """Decode a saved migration stream (like QEMU's analyze-migration.py)."""
    from confmig.proto.stream.analyze import analyze as do_analyze
    from confmig.proto.stream.analyze import format_report

    try:
        report = do_analyze(path)
    except ConfmigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))


@cli.command()
@click.option("--save", default=None, help="Directory to save results into (JSON + Markdown).")
@click.option("--quick", is_flag=True, help="Smaller sizes, fewer repetitions (a smoke run); with --suite "
                                             "mh: small dirty-rate and evacuation guests, one rate.")
@click.option("--suite", default="plain", show_default=True,
              type=click.Choice(["plain", "psp", "mh", "demo", "local"]),
              help="plain: plain migration against this machine's limits; psp: plain vs PSP migration; "
                   "mh: plain vs PSP vs Migration Handler (1, 2, 4 MH vCPUs), then a guest dirtying 1, 5 "
                   "and 10% of its pages/s and a host evacuated of four SEV guests; demo: the default "
                   "demo's wall time; local: intra-host hand-over (cpr-transfer) of 1, 4 and 8 GiB SEV "
                   "and SEV-ES guests, downtime and bytes sent.")
@click.option("--ram", default="1G", show_default=True,
              help="With --suite psp or mh: the random guest's RAM.")
@click.option("--timeout", default=BENCH_TIMEOUT, show_default=True, type=_TIMEOUT,
              help="Seconds for the whole run; past them it stops with an error.")
def bench(save: str | None, quick: bool, suite: str, ram: str, timeout: float) -> None:
    """Measure migration against this machine's own limits (results under benchmarks/)."""
    from confmig.bench.deadline import Deadline

    def run() -> bool:
        deadline = Deadline(timeout)
        if suite in ("psp", "mh"):
            from confmig.bench.confidential import run_psp_benchmark

            run_psp_benchmark(save_dir=save, ram=ram, mh=suite == "mh", quick=quick, deadline=deadline)
        elif suite == "local":
            from confmig.bench.local_suite import run_local_benchmark

            run_local_benchmark(save_dir=save, quick=quick, deadline=deadline)
        elif suite == "demo":
            from confmig.bench.demo_time import run_demo_benchmark

            run_demo_benchmark(save_dir=save, deadline=deadline)
        else:
            from confmig.bench.perf import run_benchmarks

            run_benchmarks(save_dir=save, quick=quick, deadline=deadline)
        return True

    _run_scenario(run)


@cli.command()
@click.option("--save", default=None, help="Directory to save the table into (JSON + Markdown).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["plain", "psp", "mh"]),
              help="Only this backend (repeat for more; default: all). local (cpr-transfer) sends no page "
                   "over a network: no stream attack applies to it.")
@click.option("--attack", "names", multiple=True,
              help="Only this attack (repeat for more; default: all), e.g. swap, replay, flip-payload, "
                   "rogue-target, replay-stream, restore-file.")
@click.option("--keep", is_flag=True, help="Keep the labs' directories (logs, consoles).")
@click.option("--timeout", default=BENCH_TIMEOUT, show_default=True, type=_TIMEOUT,
              help="Seconds for the whole run; past them it stops with an error.")
def attacks(save: str | None, backends: tuple[str, ...], names: tuple[str, ...], keep: bool,
            timeout: float) -> None:
    """A hostile host against each migration backend: stream attacks through a proxy, a rogue
    target, a replayed stream, a restored file. Exits non-zero unless every result is what the
    design says (docs/security.md)."""
    from confmig.bench.attacks.catalog import BACKENDS, CASES
    from confmig.bench.attacks.harness import run_attacks
    from confmig.bench.deadline import Deadline

    known = {c.name for cases in CASES.values() for c in cases}
    unknown = sorted(set(names) - known)
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} (known: {', '.join(sorted(known))})",
                                 param_hint="--attack")

    def run() -> bool:
        outcomes = run_attacks(backends=backends or tuple(BACKENDS), cases=names or None, save_dir=save,
                               deadline=Deadline(timeout), keep=keep, log=click.echo)
        return bool(outcomes) and all(o.matches for o in outcomes)

    _run_scenario(run)


@cli.command()
@click.option("--backend", "backends", multiple=True,
              help="Only this backend (repeatable): plain, psp, mh, local.")
@click.option("--fault", "faults", multiple=True, help="Only this fault (repeatable): cut-both, cut-one, "
              "target-vmm, target-host, source-vmm, cancel, slow, stall, disk-full.")
@click.option("--phase", "phases", multiple=True, help="Only this phase (repeatable): setup, first-round, "
              "later-rounds, switch-over, after-device, confirmed.")
@click.option("--save", default=None, help="Directory to save the table into (JSON + Markdown).")
@click.option("--into", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A saved table (its .json) whose cells this run replaces (a re-run of some cells).")
@click.option("--check", is_flag=True, help="Exit non-zero if a cell failed (a must did not hold).")
@click.option("--timeout", default=BENCH_TIMEOUT, show_default=True, type=_TIMEOUT,
              help="Seconds for the whole run; past them it stops with an error.")
def faults(backends: tuple[str, ...], faults: tuple[str, ...], phases: tuple[str, ...], save: str | None,
           into: str | None, check: bool, timeout: float) -> None:
    """Inject every fault at every phase of a migration, for every backend, and say what survived."""
    from confmig.bench import faults as matrix
    from confmig.bench.deadline import Deadline

    try:
        chosen_backends = [matrix.backend_named(b) for b in backends] or list(matrix.BACKENDS)
        chosen_faults = [matrix.Fault(f) for f in faults] or list(matrix.Fault)
        chosen_phases = [matrix.Phase(p) for p in phases] or list(matrix.Phase)
    except (ValueError, ConfmigError) as exc:
        raise click.BadParameter(str(exc)) from None

    def show(r: matrix.CellResult) -> None:
        if r.verdict != "n/a" or len(chosen_faults) * len(chosen_phases) == 1:
            detail = "; ".join((*r.reasons, *r.notes))
            where = "+".join(r.running) or "-"
            click.echo(f"{r.backend:6} {r.fault:12} {r.phase:13} {r.verdict:6} {where:15} "
                       f"lost={'' if r.lost is None else r.lost} again={r.again} {r.seconds:5.1f}s  {detail}")

    def run() -> bool:
        report = matrix.run_matrix(backends=chosen_backends, faults=chosen_faults, phases=chosen_phases,
                                   save_dir=save, deadline=Deadline(timeout), progress=show)
        click.echo(json.dumps(report["summary"]))
        if into:
            from pathlib import Path

            click.echo(f"merged into {matrix.merge_into(Path(into), report)}")
        return not check or all(c["verdict"] not in ("FAIL", "error") for c in report["cells"])

    _run_scenario(run)


def main() -> None:
    cli()
