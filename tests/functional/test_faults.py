"""The fault matrix (issue 13, section 1): a fast subset here, the whole matrix as a slow test
(``make faults`` saves its table under benchmarks/)."""

from __future__ import annotations

import pytest

from confmig.bench.faults import BACKENDS, FAST_CELLS, Fault, Matrix, Phase, backend_named, not_applicable


@pytest.mark.parametrize(("backend", "fault", "phase"), FAST_CELLS,
                         ids=[f"{b}-{f.value}-{p.value}" for b, f, p in FAST_CELLS])
def test_after_a_fault_exactly_one_copy_runs_with_every_acknowledged_write(
        backend: str, fault: Fault, phase: Phase) -> None:
    (r,) = Matrix().run([backend_named(backend)], [fault], [phase])
    assert r.verdict == "ok", r
    assert r.copies == 1 and r.lost == 0 and r.acked > 0
    assert r.again in ("yes", "n/a")


def test_every_backend_has_every_fault_at_some_phase() -> None:
    for b in BACKENDS:
        for f in Fault:
            if b.intra_host and f in (Fault.TARGET_HOST, Fault.DISK_FULL):
                continue
            assert any(not_applicable(b, f, p) is None for p in Phase), (b.name, f)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_whole_matrix_holds_every_must() -> None:
    results = Matrix().run(BACKENDS, Fault, Phase)
    bad = [r for r in results if r.verdict in ("FAIL", "error")]
    assert not bad, "\n".join(f"{r.backend}/{r.fault}/{r.phase}: {r.reasons}" for r in bad)


def test_an_mh_migration_fails_at_once_when_the_target_host_dies_in_the_first_round() -> None:
    """The target's MH backend cannot abort once its host is gone (each MH entry meets the
    host's closed socket); its engine must close the channel all the same, or the source stays
    blocked in its send until the management layer cancels (the matrix's 90 s hang)."""
    (r,) = Matrix().run([backend_named("mh")], [Fault.TARGET_HOST], [Phase.FIRST_ROUND])
    assert r.verdict == "ok", r
    assert r.running == ("source",) and r.lost == 0


def test_an_mh_source_whose_target_died_after_finish_runs_on_with_the_owners_abort() -> None:
    """FINISH sealed the guest's state for the target, whose VMM then died with no abort token
    sent: the source's VMM asks the guest owner, which had not let the target commit, for the
    token; the source runs on at once (it used to stay stopped: no copy ran)."""
    (r,) = Matrix().run([backend_named("mh")], [Fault.TARGET_VMM], [Phase.SWITCHOVER])
    assert r.verdict == "ok", r
    assert r.running == ("source",) and r.lost == 0 and r.again == "yes"
