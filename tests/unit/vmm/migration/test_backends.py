"""Choosing a backend: ``x-confidential-backend``, refused in QEMU's words when the guest
cannot use it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from confmig.common.errors import ConfigError, MigrationError
from confmig.vmm.migration import backends
from confmig.vmm.migration.backend import OutgoingBackend
from confmig.vmm.migration.params import CONFIDENTIAL_BACKENDS, MigrationParameters
from confmig.vmm.migration.plain import PlainIncoming, PlainOutgoing
from confmig.vmm.migration.ram import MAX_BATCH_PAGES


def machine(*, sev: bool, plain_copy: bool = False, mh: bool = False) -> SimpleNamespace:
    config = SimpleNamespace(x_plain_copy=plain_copy, es=False)
    return SimpleNamespace(sev=SimpleNamespace(config=config, receiving=False) if sev else None,
                           mh=SimpleNamespace() if mh else None, cpr=None)


def test_every_named_backend_has_both_sides() -> None:
    assert set(backends.BACKENDS) == set(CONFIDENTIAL_BACKENDS)
    assert backends.default_confidential(machine(sev=True)) == "psp"
    assert backends.default_confidential(machine(sev=True, mh=True)) == "mh"


def test_an_unknown_backend_is_refused_as_qapi_refuses_an_enum_value() -> None:
    with pytest.raises(ConfigError, match="Parameter 'x-confidential-backend' does not accept value 'fast'"):
        MigrationParameters().with_parameters({"x-confidential-backend": "fast"})
    with pytest.raises(ConfigError, match="expected: string"):
        MigrationParameters().with_parameters({"x-confidential-backend": 1})
    p = MigrationParameters().with_parameters({"x-confidential-backend": "psp"})
    assert p.qmp_parameters()["x-confidential-backend"] == "psp"


@pytest.mark.parametrize("plain_copy", [False, True])
def test_a_guest_that_is_not_confidential_refuses_a_confidential_backend(plain_copy: bool) -> None:
    m = machine(sev=plain_copy, plain_copy=plain_copy)
    psp = MigrationParameters(x_confidential_backend="psp")
    why = "migrates as a plain one" if plain_copy else "requires a confidential guest"
    with pytest.raises(MigrationError, match=f"x-confidential-backend 'psp': this SEV guest {why}"
                       if plain_copy else f"x-confidential-backend 'psp': {why}"):
        backends.check(m, psp)  # type: ignore[arg-type]
    backends.check(m, MigrationParameters())  # type: ignore[arg-type]
    assert isinstance(backends.outgoing_backend(m, MigrationParameters(), None, None), PlainOutgoing)  # type: ignore[arg-type]
    assert isinstance(backends.incoming_backend(m, MigrationParameters()), PlainIncoming)  # type: ignore[arg-type]


def test_migrate_refuses_what_the_psp_backend_cannot_do_before_anything_starts() -> None:
    m = machine(sev=True)
    with pytest.raises(MigrationError, match="sev-pdh"):
        backends.check(m, MigrationParameters())  # type: ignore[arg-type]
    certs = {"sev_pdh": "AA==", "sev_plat_cert": "AA==", "sev_amd_cert": "AA=="}
    backends.check(m, MigrationParameters(**certs))  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match="multifd is not supported"):
        backends.check(m, MigrationParameters(**certs, capabilities=frozenset({"multifd"})))  # type: ignore[arg-type]


def test_a_confidential_guest_uses_its_default_or_the_chosen_backend() -> None:
    m = machine(sev=True)
    for chosen in ("", "psp"):
        params = MigrationParameters(x_confidential_backend=chosen)
        with pytest.raises(MigrationError, match="sev-pdh"):  # the PSP backend wants certificates
            backends.outgoing_backend(m, params, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, MAX_BATCH_PAGES + 1])
def test_a_backend_cannot_ask_for_batches_the_main_channel_cannot_carry(size: int) -> None:
    with pytest.raises(TypeError, match="batch_pages must be"):
        type("Greedy", (OutgoingBackend,), {"name": "greedy", "batch_pages": size})
