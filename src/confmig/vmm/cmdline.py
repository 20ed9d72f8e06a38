"""The VMM's command line, shaped like ``qemu-system-x86_64``'s (PROTOCOLS.md §3).

QEMU options take one dash and a ``key=value,key=value`` argument (``,,`` is a
literal comma; the first bare value fills an *implied* key). Two options are
ours: ``--host SOCKET`` (which ``confmig host`` to run on) and
``--guest WORKLOAD[,key=value...]`` (what the guest kernel runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confmig.common.errors import ConfigError
from confmig.common.units import PAGE_SIZE, MiB, parse_size
from confmig.common.x86 import KVM_FEATURE_HC_MAP_GPA_RANGE, KVM_FEATURE_MIGRATION_CONTROL
from confmig.proto import keybroker
from confmig.vmm.migration.cpr import incoming_option

WORKLOADS = ("idle", "dirty", "kv")
DEFAULT_RAM = 128 * MiB
"""QEMU's default ``-m``."""


def parse_opts(text: str, implied: str | None = None, *, option: str = "") -> dict[str, str]:
    """Split ``a=1,b=2`` (QEMU's QemuOpts syntax) into a dict."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0 and implied:
                key, value = implied, part
            else:
                raise ConfigError(f"{option}: invalid parameter '{part}' (expected key=value)")
        if key in out:
            raise ConfigError(f"{option}: parameter '{key}' given twice")
        out[key] = value
    return out


def _bool(value: str, what: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"{what}: '{value}' is not on/off")


@dataclass(frozen=True, slots=True, kw_only=True)
class QmpEndpoint:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestSpec:
    workload: str
    options: dict[str, str] = field(default_factory=dict)

    def kernel_cmdline(self) -> str:
        """What the firmware hands the guest kernel (fw_cfg ``CMDLINE``)."""
        return " ".join([f"workload={self.workload}", *(f"{k}={v}" for k, v in self.options.items())])


CPU_MODELS = ("host", "EPYC", "EPYC-Rome", "EPYC-Milan", "qemu64")
"""Accepted ``-cpu`` models: every one is this host's CPU (the emulated cores have one model)."""
KVM_PV_FEATURES = {
    "kvm-hc-map-gpa-range": KVM_FEATURE_HC_MAP_GPA_RANGE,
    "kvm-migration-control": KVM_FEATURE_MIGRATION_CONTROL,
}
"""The paravirtual features of CPUID 0x40000001 EAX this VMM can hide, by bit. QEMU
spells KVM features ``kvm-*`` on ``-cpu``; these two bits have no upstream name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuConfig:
    """``-cpu MODEL[,FEATURE=on|off|,+FEATURE|,-FEATURE]...``."""

    model: str = "host"
    kvm_features_off: frozenset[str] = frozenset()

    def kvm_feature(self, name: str) -> bool:
        return name not in self.kvm_features_off

    def kvm_pv_features(self) -> int:
        """CPUID 0x40000001 EAX bits of the features not hidden."""
        return sum(1 << bit for name, bit in KVM_PV_FEATURES.items() if self.kvm_feature(name))


def _cpu(text: str) -> CpuConfig:
    model, _, rest = text.partition(",")
    if model not in CPU_MODELS:
        raise ConfigError(f"-cpu: unknown model '{model}' (choose from {', '.join(CPU_MODELS)})")
    off: set[str] = set()
    for item in filter(None, rest.split(",")):
        if item[0] in "+-":
            name, enabled = item[1:], item[0] == "+"
        else:
            name, sep, val = item.partition("=")
            enabled = _bool(val, f"-cpu {name}") if sep else True
        if name not in KVM_PV_FEATURES:
            raise ConfigError(f"-cpu: unknown feature '{name}' (known: {', '.join(KVM_PV_FEATURES)})")
        (off.discard if enabled else off.add)(name)
    return CpuConfig(model=model, kvm_features_off=frozenset(off))


SEV_POLICY_ES = 1 << 2
HOST_CBITPOS = 51
"""What this (emulated) host's CPUID 0x8000001F reports."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SevGuestConfig:
    """``-object sev-guest,id=ID,policy=0x..,cbitpos=51,reduced-phys-bits=1[,owner=URL]``."""

    id: str
    policy: int = 0x1
    cbitpos: int = HOST_CBITPOS
    reduced_phys_bits: int = 1
    owner: str | None = None
    """The guest owner's key broker (``confmig owner serve``); ours, not QEMU's."""
    x_plain_copy: bool = False
    """TEST ONLY (``x-plain-copy=on``): migrate this guest's RAM as a plain guest's, i.e. the
    ciphertext the host sees. It exists to show that ciphertext is bound to its host's key
    and address: the target guest finds garbage and fails. Never a way to migrate."""

    @property
    def es(self) -> bool:
        return bool(self.policy & SEV_POLICY_ES)


def _sev_guest(opts: dict[str, str]) -> SevGuestConfig:
    known = {"qom-type", "id", "policy", "cbitpos", "reduced-phys-bits", "owner", "x-plain-copy"}
    unknown = set(opts) - known
    if unknown:
        raise ConfigError(f"-object sev-guest: unknown property '{sorted(unknown)[0]}'")
    try:
        policy = int(opts.get("policy", "0x1"), 0)
        cbitpos = int(opts.get("cbitpos", str(HOST_CBITPOS)), 0)
        reduced = int(opts.get("reduced-phys-bits", "1"), 0)
    except ValueError as exc:
        raise ConfigError(f"-object sev-guest: {exc}") from None
    if not 0 <= policy < 1 << 32:
        raise ConfigError("-object sev-guest: policy is a 32-bit value")
    if cbitpos != HOST_CBITPOS:
        raise ConfigError(f"sev: cbitpos check failed, host '{HOST_CBITPOS}' requested '{cbitpos}'")
    if reduced != 1:
        raise ConfigError(f"sev: reduced_phys_bits check failed, it should be 1, requested '{reduced}'")
    if "owner" in opts:
        keybroker.check_url(opts["owner"])
    return SevGuestConfig(id=opts["id"], policy=policy, cbitpos=cbitpos, reduced_phys_bits=reduced,
                          owner=opts.get("owner"),
                          x_plain_copy=_bool(opts.get("x-plain-copy", "off"), "sev-guest x-plain-copy"))


MAX_MIRROR_VCPUS = 4
"""Migration Handler vCPUs a guest may have (the firmware's mailbox area serves 4)."""
MH_TARGET_FW_CFG = "opt/ovmf/PcdSevIsMigrationTarget"
"""``-fw_cfg name=opt/ovmf/PcdSevIsMigrationTarget,string=1``: the firmware boots only its
Migration Handler and waits for an incoming migration (the 2021 RFC's name)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    host: str
    ram_size: int = DEFAULT_RAM
    smp: int = 1
    mirror_vcpus: int = 0
    """``-smp N,mirrorvcpus=M``: Migration Handler vCPUs, in a mirror VM of the SEV guest."""
    cpu: CpuConfig = field(default_factory=CpuConfig)
    name: str = "confmig"
    guest: GuestSpec = field(default_factory=lambda: GuestSpec(workload="idle"))
    qmp: tuple[QmpEndpoint, ...] = ()
    incoming: str | None = None
    cpr_incoming: str | None = None
    """The ``cpr`` channel (``unix:PATH``) of a second ``-incoming``, QEMU 10's ``cpr-transfer``:
    the VMM reads the old VMM's descriptors there before it builds its machine."""
    start_paused: bool = False
    daemonize: bool = False
    pidfile: str | None = None
    serial: str = "stdio"
    """``stdio``, ``file:PATH`` or ``none``."""
    fw_cfg_files: dict[str, bytes] = field(default_factory=dict)
    kv_socket: str | None = None
    prealloc: bool = False
    objects: dict[str, dict[str, str]] = field(default_factory=dict)
    """``-object TYPE,id=ID,...`` by id (confidential objects arrive in later issues)."""
    confidential_guest_support: str | None = None
    sev: SevGuestConfig | None = None
    """Set when ``-machine confidential-guest-support`` names a ``sev-guest`` object."""
    bios: str | None = None
    """``-bios PATH``: the firmware image (measured and encrypted for SEV guests)."""

    @property
    def mh_target(self) -> bool:
        """Started as a Migration Handler target: the firmware runs only its MH."""
        return self.fw_cfg_files.get(MH_TARGET_FW_CFG) == b"1"


USAGE = """usage: confmig vm --host SOCKET [options]
  -m SIZE                   guest RAM (default 128M)
  -cpu MODEL[,-kvm-migration-control][,-kvm-hc-map-gpa-range]   hide KVM PV features
  -smp N[,mirrorvcpus=M]    vCPUs (and M Migration Handler vCPUs for an SEV guest)
  -name NAME                VM name
  --guest WORKLOAD[,k=v]    idle | dirty[,rate=N,wss=SIZE,fill=random|zero,seed=N] | kv
                            (SEV guests: sev_migration=off keeps the kernel from allowing migration)
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off
  -incoming defer | tcp:HOST:PORT | unix:PATH | file:PATH | exec:CMD
  -incoming '{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": P}}'
                            (cpr-transfer: take over a guest from a VMM on this host)
  -S                        do not start vCPUs (use 'cont')
  -serial stdio | file:PATH | none
  -fw_cfg name=opt/NAME,string=TEXT | name=opt/NAME,file=PATH
  -device confmig-kv,path=SOCKET
  -object memory-backend-ram,id=ID,size=SIZE[,prealloc=on]
  -machine [type=]q35[,confidential-guest-support=ID]
  -object sev-guest,id=ID,policy=0x1[,cbitpos=51,reduced-phys-bits=1,owner=URL]
  -bios PATH                firmware image (default: the built-in one)
  -daemonize  -pidfile PATH"""


def parse(argv: list[str]) -> MachineConfig:
    """Parse a VMM command line; every mistake is a one-line :class:`ConfigError`."""
    kw: dict[str, object] = {}
    qmp: list[QmpEndpoint] = []
    files: dict[str, bytes] = {}
    objects: dict[str, dict[str, str]] = {}
    args = list(argv)
    i = 0

    def value(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(args):
            raise ConfigError(f"{opt}: requires an argument")
        i += 1
        return args[i]

    while i < len(args):
        opt = args[i]
        o = opt[1:] if opt.startswith("--") else opt  # QEMU accepts -opt and --opt alike
        if o == "-host":
            kw["host"] = value(opt)
        elif o == "-m":
            m = parse_opts(value(opt), "size", option="-m")
            try:
                size = parse_size(m.get("size", ""), default_suffix="M")
            except ValueError as exc:
                raise ConfigError(f"-m: {exc}") from None
            if size < 4 * MiB or size % PAGE_SIZE:
                raise ConfigError(f"-m: {size} bytes is too small or not page aligned (minimum 4M)")
            kw["ram_size"] = size
        elif o == "-smp":
            s = parse_opts(value(opt), "cpus", option="-smp")
            try:
                n = int(s.get("cpus", "1"))
            except ValueError:
                raise ConfigError(f"-smp: '{s.get('cpus')}' is not a number") from None
            if not 1 <= n <= 16:
                raise ConfigError("-smp: between 1 and 16 vCPUs")
            kw["smp"] = n
            try:
                mirrors = int(s.get("mirrorvcpus", "0"))
            except ValueError:
                raise ConfigError(f"-smp: mirrorvcpus '{s.get('mirrorvcpus')}' is not a number") from None
            if not 0 <= mirrors <= MAX_MIRROR_VCPUS:
                raise ConfigError(f"-smp: mirrorvcpus between 0 and {MAX_MIRROR_VCPUS}")
            kw["mirror_vcpus"] = mirrors
        elif o == "-cpu":
            kw["cpu"] = _cpu(value(opt))
        elif o == "-name":
            kw["name"] = parse_opts(value(opt), "guest", option="-name").get("guest", "confmig")
        elif o == "-guest":
            g = value(opt)
            work, _, rest = g.partition(",")
            if work not in WORKLOADS:
                raise ConfigError(f"--guest: unknown workload '{work}' (choose from {', '.join(WORKLOADS)})")
            kw["guest"] = GuestSpec(workload=work, options=parse_opts(rest, option="--guest"))
        elif o == "-qmp":
            qmp.append(_qmp_endpoint(value(opt)))
        elif o == "-incoming":
            ctype, where = incoming_option(value(opt))
            key = "incoming" if ctype == "main" else "cpr_incoming"
            if key in kw:
                raise ConfigError(f"-incoming: a second {ctype} channel")
            kw[key] = where
        elif o == "-S":
            kw["start_paused"] = True
        elif o == "-daemonize":
            kw["daemonize"] = True
        elif o == "-pidfile":
            kw["pidfile"] = value(opt)
        elif o == "-serial":
            serial = value(opt)
            if serial not in ("stdio", "none") and not serial.startswith("file:"):
                raise ConfigError(f"-serial: '{serial}' is not stdio, none or file:PATH")
            kw["serial"] = serial
        elif o == "-fw_cfg":
            f = parse_opts(value(opt), "name", option="-fw_cfg")
            fname = f.get("name", "")
            if not fname.startswith("opt/"):
                raise ConfigError("-fw_cfg: name must start with 'opt/'")
            if len(fname) > 55:
                raise ConfigError("-fw_cfg: name is longer than 55 characters")
            if "string" in f:
                files[fname] = f["string"].encode()
            elif "file" in f:
                try:
                    with open(f["file"], "rb") as fh:
                        files[fname] = fh.read()
                except OSError as exc:
                    raise ConfigError(f"-fw_cfg: cannot read {f['file']}: {exc.strerror}") from None
            else:
                raise ConfigError("-fw_cfg: needs string= or file=")
        elif o == "-device":
            d = parse_opts(value(opt), "driver", option="-device")
            if d.get("driver") != "confmig-kv":
                raise ConfigError(f"-device: unknown driver '{d.get('driver')}' (only confmig-kv)")
            if "path" not in d:
                raise ConfigError("-device confmig-kv: needs path=SOCKET")
            kw["kv_socket"] = d["path"]
        elif o == "-object":
            ob = parse_opts(value(opt), "qom-type", option="-object")
            oid = ob.get("id")
            if not oid:
                raise ConfigError("-object: Parameter 'id' is missing")
            if ob.get("qom-type") == "memory-backend-ram":
                if _bool(ob.get("prealloc", "off"), "-object prealloc"):
                    kw["prealloc"] = True
            elif ob.get("qom-type") not in ("sev-guest",):
                raise ConfigError(f"-object: unknown type '{ob.get('qom-type')}'")
            objects[oid] = ob
        elif o == "-machine":
            mo = parse_opts(value(opt), "type", option="-machine")
            if mo.get("type", "q35") not in ("q35", "pc", "pc-q35-7.2"):
                raise ConfigError(f"-machine: unsupported type '{mo['type']}' (q35)")
            if "confidential-guest-support" in mo:
                kw["confidential_guest_support"] = mo["confidential-guest-support"]
        elif o == "-bios":
            kw["bios"] = value(opt)
        elif o in ("-nographic", "-nodefaults", "-enable-kvm"):
            pass  # accepted for QEMU muscle memory; this machine is always like that
        else:
            raise ConfigError(f"'{opt}' is not a valid option\n{USAGE}")
        i += 1
    if "host" not in kw:
        raise ConfigError("--host SOCKET is required (the 'confmig host' to run on)")
    if "cpr_incoming" in kw:
        if "incoming" not in kw:
            raise ConfigError("-incoming: a cpr channel needs a main channel too (a second -incoming)")
        if not str(kw["cpr_incoming"]).startswith("unix:"):
            raise ConfigError("-incoming: the cpr channel must be a unix socket")
        if kw["incoming"] == "defer":
            # The old VMM connects the main channel as soon as we hang up the cpr channel.
            raise ConfigError("-incoming defer with a cpr channel is not supported: give the main "
                              "channel's address on the command line")
    cgs = kw.get("confidential_guest_support")
    if cgs is not None:
        obj = objects.get(str(cgs))
        if obj is None:
            raise ConfigError(f"-machine confidential-guest-support={cgs}: no object with id '{cgs}'")
        if obj.get("qom-type") != "sev-guest":
            raise ConfigError(f"-machine confidential-guest-support={cgs}: not a sev-guest object")
        kw["sev"] = _sev_guest(obj)
    return MachineConfig(qmp=tuple(qmp), fw_cfg_files=files, objects=objects, **kw)  # type: ignore[arg-type]


def _qmp_endpoint(text: str) -> QmpEndpoint:
    addr, _, rest = text.partition(",")
    opts = parse_opts(rest, option="-qmp")
    for k, v in opts.items():
        if k not in ("server", "wait"):
            raise ConfigError(f"-qmp: unknown option '{k}'")
        _bool(v, f"-qmp {k}")
    if opts and not _bool(opts.get("server", "on"), "-qmp server"):
        raise ConfigError("-qmp: only server=on is supported")
    if addr.startswith("unix:"):
        return QmpEndpoint(kind="unix", path=addr[5:])
    if addr.startswith("tcp:"):
        host, _, port = addr[4:].rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"-qmp: '{addr}' needs tcp:HOST:PORT")
        return QmpEndpoint(kind="tcp", host=host or "127.0.0.1", port=int(port))
    raise ConfigError(f"-qmp: '{addr}' is not unix:PATH or tcp:HOST:PORT")
