"""The attack harness's fast subset (the whole of it: ``make attacks``): a hostile host
between two VMMs, through the harness's own proxy and scenario code. Plain migration has no
integrity: a swap of two pages' contents runs there corrupted. The PSP path catches a
flipped ciphertext bit (the packet MAC) and does not catch a stale replay of a page's
previous version (docs/psp.md, "What the SEV API does not stop"): the target runs a guest
whose self-check fails. Each outcome is what ``confmig.bench.attacks.catalog`` says."""

from __future__ import annotations

import re

import pytest

from confmig.bench.attacks.catalog import CASES, QUICK, Expected
from confmig.bench.attacks.harness import run_case
from confmig.bench.lab import HostProc, Lab


@pytest.mark.parametrize(("backend", "name"), [(b, n) for b, names in QUICK.items() for n in names])
def test_an_attack_comes_out_as_the_design_says(lab: Lab, hosts: tuple[HostProc, HostProc], backend: str,
                                                 name: str) -> None:
    case = next(c for c in CASES[backend] if c.name == name)
    a, b = hosts
    outcome = run_case(lab, [a, b, b], backend, case)
    assert outcome.matches, outcome
    # A migration whose last round held no page the attack needs runs again (the harness says
    # so in front: "(attempt 2: ...) "); what counts is that the attack acted in the one judged.
    acted = re.sub(r"^\(attempt \d+: [^)]*\) ", "", outcome.acted)
    assert acted.startswith(f"{case.attack.name}: ") if case.attack else acted, outcome
    if case.expected is Expected.CAUGHT:
        assert outcome.migration == "failed" and outcome.caught_by, outcome
        assert outcome.source == "running" and outcome.source_selfcheck.startswith("confmig-selfcheck: PASS")
    else:
        assert outcome.target == "running", outcome
        assert outcome.target_selfcheck.startswith("confmig-selfcheck: FAIL"), outcome
