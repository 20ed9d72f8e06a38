"""Key-holding classes redact their repr and refuse to be pickled or copied."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from psp_fakes import Platform

from confmig.platform.psp import (
    VEK_SIZE,
    ActivateRequest,
    Asid,
    DeactivateRequest,
    LaunchStartRequest,
    PlatformIdentity,
    TransportKeys,
)
from confmig.platform.psp.cert import CertAlgo, CertKeyPair, CertUsage
from confmig.platform.psp.guest import GuestContext
from confmig.platform.psp.identity import AmdRootOfTrust
from confmig.platform.psp.secret import Secret

TEK, TIK, VEK = b"\xa1" * 16, b"\xb2" * 16, b"\xc3" * 16


def _secrets(identity: PlatformIdentity, amd_root_dir: Path) -> list[Secret]:
    keys = TransportKeys(tek=TEK, tik=TIK)
    p = Platform.build(identity)
    p.boot()
    return [
        keys,
        p.owner_session(0),
        CertKeyPair(
            usage=CertUsage.PEK, algo=CertAlgo.ECDSA_SHA256, key=ec.generate_private_key(ec.SECP384R1())
        ),
        identity,
        AmdRootOfTrust.load_or_create(amd_root_dir, key_bits=2048),
        GuestContext(
            handle=p.psp.launch_start(LaunchStartRequest(policy=0)).handle, policy=0, vek=VEK, channel=keys
        ),
        p.psp,
    ]


def test_secret_classes_redact_and_refuse_pickling(identity: PlatformIdentity, amd_root_dir: Path) -> None:
    for secret in _secrets(identity, amd_root_dir):
        name = type(secret).__name__
        text = repr(secret) + str(secret) + f"{secret}"
        assert text.count("redacted") == 3 and name in text
        for needle in (TEK.hex(), TIK.hex(), VEK.hex(), "a1a1", "b2b2", "c3c3", "\\xa1", "\\xb2", "\\xc3"):
            assert needle not in text, name
        for copier in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot be pickled"):
                copier(secret)
        with pytest.raises(TypeError):
            pickle.dumps(secret, protocol=0)


def test_activate_installs_the_vek_and_deactivate_clears_it(identity: PlatformIdentity) -> None:
    p = Platform.build(identity)
    p.boot()
    handle = p.psp.launch_start(LaunchStartRequest(policy=0)).handle
    assert p.keys.vek(Asid(30)) is None
    p.psp.activate(ActivateRequest(handle=handle, asid=Asid(30)))
    vek = p.keys.vek(Asid(30))
    assert vek is not None and len(vek) == VEK_SIZE == 16
    p.psp.deactivate(DeactivateRequest(handle=handle))
    assert p.keys.vek(Asid(30)) is None
