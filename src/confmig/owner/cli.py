"""``confmig owner``: the guest owner's command line.

Attach to the main CLI with ``cli.add_command(owner)`` (``from confmig.owner.cli import owner``).
Heavy imports happen inside the commands, so ``confmig --help`` stays fast.

::

    confmig owner serve [--amd-root DIR] --policy 0x1
                        (--firmware PATH [--vcpus N] [--mh-vcpus M] | --firmware-digest HEX)
                        [--secret GUID=HEX | --secret GUID=@FILE]... [--vm NAME]
                        [--listen 127.0.0.1:PORT] [--state DIR] [--ark-hash HEX] [--session-ttl SECONDS]
    confmig owner digest PATH [--sev-es-vcpus N [--mh-vcpus M]]
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

if TYPE_CHECKING:
    from confmig.owner.profile import VmProfile

MAX_SECRET_FILE: Final = 0x5000
"""A secret file larger than one LAUNCH_SECRET can carry is certainly a mistake."""
URL_FILE: Final = "url"
AUDIT_FILE: Final = "audit.jsonl"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got '{value}'")
    return host, int(port)


def parse_policy(value: str) -> int:
    try:
        policy = int(value, 0)
    except ValueError:
        raise click.BadParameter(f"expected an integer such as 0x1, got '{value}'") from None
    if not 0 <= policy <= 0xFFFF_FFFF:
        raise click.BadParameter(f"policy {value} does not fit in 32 bits")
    return policy


def parse_hex(value: str, size: int, what: str) -> bytes:
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise click.BadParameter(f"{what}: not hexadecimal") from None
    if len(data) != size:
        raise click.BadParameter(f"{what}: expected {size} bytes ({2 * size} hex digits), got {len(data)}")
    return data


def parse_secret(spec: str) -> tuple[uuid.UUID, bytes]:
    """``GUID=HEX`` or ``GUID=@FILE`` (the file's bytes; keeps the key out of ``ps``)."""
    guid_text, sep, value = spec.partition("=")
    try:
        guid = uuid.UUID(guid_text)
    except ValueError:
        raise click.BadParameter(f"expected GUID=HEX or GUID=@FILE, got a bad GUID '{guid_text}'") from None
    if not sep:
        raise click.BadParameter(f"expected GUID=HEX or GUID=@FILE for {guid}")
    if value.startswith("@"):
        try:
            with open(value[1:], "rb") as f:
                data = f.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise click.BadParameter(f"secret {guid}: cannot read {value[1:]}: {exc.strerror}") from None
        if len(data) > MAX_SECRET_FILE:
            raise click.BadParameter(f"secret {guid}: {value[1:]} is larger than {MAX_SECRET_FILE} bytes")
        return guid, data
    try:
        return guid, bytes.fromhex(value)
    except ValueError:
        raise click.BadParameter(f"secret {guid}: not hexadecimal (use @FILE for raw bytes)") from None


def build_profile(
    *, firmware: str | None, firmware_digest: str | None, policy: int, secrets: tuple[str, ...],
    vcpus: int = 1, mh_vcpus: int = 0,
) -> VmProfile:
    """The VM profile the options describe; ``click.UsageError``/``BadParameter`` if they do not."""
    from confmig.owner.measurement import firmware_digest as digest_of
    from confmig.owner.profile import VmProfile
    from confmig.platform.psp.policy import PolicyFlag

    if (firmware is None) == (firmware_digest is None):
        raise click.UsageError("give exactly one of --firmware PATH and --firmware-digest HEX")
    if firmware is not None:
        try:
            es_vcpus = vcpus if policy & PolicyFlag.ES else 0
            digest = digest_of(Path(firmware).read_bytes(), sev_es_vcpus=es_vcpus, mh_vcpus=mh_vcpus)
        except OSError as exc:
            raise click.BadParameter(f"cannot read {firmware}: {exc.strerror}", param_hint="--firmware") \
                from None
        except ValueError as exc:
            raise click.BadParameter(f"{firmware}: {exc}", param_hint="--mh-vcpus") from None
    else:
        assert firmware_digest is not None
        digest = parse_hex(firmware_digest, 32, "--firmware-digest")
    try:
        return VmProfile.build(digest=digest, policy=policy, secrets=[parse_secret(s) for s in secrets])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret") from None


@click.group("owner")
def owner() -> None:
    """The guest owner: verify platforms, check launch measurements, release secrets."""


@owner.command()
@click.option("--amd-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="The installation's AMD root directory (its amd-certs.json): the trusted root "
                   "(default: the one the hosts of this installation use).")
@click.option("--ark-hash", default=None, help="Pin the ARK's SHA-384 key hash (hex).")
@click.option("--firmware", type=click.Path(exists=True, dir_okay=False),
              help="The firmware image the VM must launch (its digest is expected).")
@click.option("--firmware-digest", default=None, help="Or the expected launch digest (SHA-256, hex).")
@click.option("--policy", required=True, help="The guest policy the VM must launch with, e.g. 0x1.")
@click.option("--secret", "secrets", multiple=True, metavar="GUID=HEX|GUID=@FILE",
              help="A secret table entry to release (repeatable).")
@click.option("--vm", default="*", show_default=True, help="The VM name this applies to ('*': any).")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT to serve on (port 0: any free port; the URL is printed).")
@click.option("--state", "state_dir", default=None, type=click.Path(file_okay=False),
              help=f"Directory for '{URL_FILE}' (the URL served) and '{AUDIT_FILE}' (verdicts, no keys).")
@click.option("--session-ttl", default=300.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Seconds a launch session waits for its measurement.")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 16),
              help="With an SEV-ES policy and --firmware: the vCPUs whose VMSAs the launch measures.")
@click.option("--mh-vcpus", default=0, show_default=True, type=click.IntRange(0, 4),
              help="With an SEV-ES policy and --firmware: the Migration Handler vCPUs "
                   "(-smp N,mirrorvcpus=M) whose entry VMSAs the launch measures.")
def serve(amd_root: str | None, ark_hash: str | None, firmware: str | None, firmware_digest: str | None,
          policy: str, secrets: tuple[str, ...], vm: str, listen: str, state_dir: str | None,
          session_ttl: float, vcpus: int, mh_vcpus: int) -> None:
    """Run the key broker: release a VM's secrets only to the launch the owner expects."""
    from confmig.common.errors import ConfigError
    from confmig.common.paths import default_amd_root
    from confmig.owner.audit import AuditLog
    from confmig.owner.broker import KeyBroker
    from confmig.owner.service import make_server
    from confmig.owner.trust import AmdRoot

    logging.basicConfig(level=os.environ.get("CONFMIG_LOG", "WARNING"),
                        format="%(asctime)s owner[%(process)d] %(levelname)s %(message)s")
    host, port = parse_listen(listen)
    profile = build_profile(firmware=firmware, firmware_digest=firmware_digest,
                            policy=parse_policy(policy), secrets=secrets, vcpus=vcpus,
                            mh_vcpus=mh_vcpus)
    pin = parse_hex(ark_hash, 48, "--ark-hash") if ark_hash is not None else None
    try:
        root = AmdRoot.load(Path(amd_root) if amd_root else default_amd_root(), pin=pin)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    state = Path(state_dir) if state_dir else None
    if state is not None:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    audit = AuditLog(state / AUDIT_FILE) if state is not None else None
    broker = KeyBroker(root, {vm: profile}, ttl=session_ttl, audit=audit)
    try:
        server = make_server(broker, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    if state is not None:
        tmp = state / f".{URL_FILE}.tmp"
        tmp.write_text(server.url + "\n")
        tmp.replace(state / URL_FILE)

    def stop(_sig: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    click.echo(f"confmig owner: serving on {server.url}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()


@owner.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--sev-es-vcpus", default=0, show_default=True, type=click.IntRange(0, 16),
              help="An SEV-ES launch of this many vCPUs (their reset VMSAs are measured too).")
@click.option("--mh-vcpus", default=0, show_default=True, type=click.IntRange(0, 4),
              help="SEV-ES: the guest's Migration Handler vCPUs (-smp N,mirrorvcpus=M; their entry "
                   "VMSAs are measured too).")
def digest(path: str, sev_es_vcpus: int, mh_vcpus: int) -> None:
    """Print the launch digest of a firmware image (what --firmware-digest expects)."""
    from confmig.owner.measurement import firmware_digest

    try:
        value = firmware_digest(Path(path).read_bytes(), sev_es_vcpus=sev_es_vcpus, mh_vcpus=mh_vcpus)
    except ValueError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--mh-vcpus") from None
    click.echo(value.hex())
