from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confmig.common.errors import ProtocolError
from confmig.vmm.shared_regions import SharedRegions

ops = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40), st.booleans()), max_size=40)


@given(ops)
def test_matches_a_page_by_page_model(operations: list[tuple[int, int, bool]]) -> None:
    regions, model = SharedRegions(), [False] * 256
    for gfn, n, shared in operations:
        regions.update(gfn, n, shared=shared)
        for p in range(gfn, gfn + n):
            model[p] = shared
    assert [regions.is_shared(p) for p in range(256)] == model
    ranges = regions.ranges()
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(ranges))  # coalesced
    assert regions.shared_pages() == sum(model)
    assert SharedRegions.decode(regions.encode()).ranges() == ranges


def _ranges(*pairs: tuple[int, int]) -> bytes:
    body = b"".join(g.to_bytes(8, "big") + n.to_bytes(8, "big") for g, n in pairs)
    return len(pairs).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\0\0\0\x01",
        _ranges((0, 0)),
        _ranges((0x2000, 0x1000), (0x1000, 0x1000)),
        _ranges((0x10, 0x1000)),
        b"\xff\xff\xff\xff",
    ],
)
def test_bad_lists_from_the_stream_are_refused(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        SharedRegions.decode(blob)


def test_shared_mask_answers_a_batch_as_is_shared_answers_one() -> None:
    import numpy as np

    regions = SharedRegions()
    assert not regions.shared_mask(np.arange(4, dtype=np.int64)).any()
    regions.update(1, 2, shared=True)
    regions.update(10, 1, shared=True)
    gfns = np.arange(0, 14, dtype=np.int64)
    assert regions.shared_mask(gfns).tolist() == [regions.is_shared(int(g)) for g in gfns]
    assert regions.shared_mask(gfns).nonzero()[0].tolist() == [1, 2, 10]
