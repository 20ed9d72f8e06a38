"""The local suite's bars and chart, from a report's rows alone."""

from __future__ import annotations

from typing import Any

from confmig.bench.chart import PNG_SIGNATURE, png
from confmig.bench.local_suite import bars, chart_of


def row(kind: str, size: str, size_bytes: int, downtimes: list[int], sent: int) -> dict[str, Any]:
    return {"kind": kind, "size": size, "size_bytes": size_bytes, "downtimes_ms": downtimes,
            "downtime_ms": sorted(downtimes)[len(downtimes) // 2], "bytes_sent": sent, "selfcheck": "PASS"}


def test_the_bars_judge_the_worst_hand_over_and_the_growth_with_size() -> None:
    sizes = (("1G", 1 << 30), ("8G", 8 << 30))
    good = [row(k, s, n, [4, 5, 6], 1064) for k in ("sev", "sev-es") for s, n in sizes]
    b = bars(good)
    assert b["downtime"]["met"] and b["growth"]["met"] and b["bytes"]["met"] and b["selfcheck"]["met"]
    grown = [*good[:3], row("sev-es", "8G", 8 << 30, [40, 45, 49], 2 << 20)]
    b = bars(grown)
    assert b["downtime"]["met"]  # 49 ms is under the bar ...
    assert not b["growth"]["met"] and b["growth"]["growth_ms"]["sev-es"] == 40  # ... but it grew
    assert not b["bytes"]["met"] and b["bytes"]["worst_bytes"] == 2 << 20


def test_the_chart_draws_from_the_rows() -> None:
    c = chart_of("local-x", {"rows": [row("sev", "1G", 1 << 30, [4, 5, 6], 1064)]})
    assert c.file == "local-x.png" and len(c.panels) == 2
    assert png(c).startswith(PNG_SIGNATURE)
