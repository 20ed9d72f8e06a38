from __future__ import annotations

import pytest

from confmig.common.errors import ConfigError
from confmig.vmm.migration.convergence import RoundResult, downtime_limit_policy
from confmig.vmm.migration.params import MAX_THROTTLE, MigrationParameters
from confmig.vmm.migration.transport import parse_uri


def test_switch_over_when_the_rest_fits_the_downtime_limit() -> None:
    bw = 1e9  # 1 GB/s: 300 ms moves 300 MB
    assert downtime_limit_policy(RoundResult(remaining_bytes=299_000_000, bandwidth=bw,
                                             downtime_limit_ms=300))
    assert not downtime_limit_policy(RoundResult(remaining_bytes=301_000_000, bandwidth=bw,
                                                 downtime_limit_ms=300))
    # avail-switchover-bandwidth overrides the measurement
    assert downtime_limit_policy(RoundResult(remaining_bytes=301_000_000, bandwidth=bw,
                                             downtime_limit_ms=300, switchover_bandwidth=2 * 10**9))


def test_parameters_have_qemus_defaults_and_bounds() -> None:
    p = MigrationParameters()
    assert p.qmp_parameters()["downtime-limit"] == 300
    assert p.qmp_parameters()["max-bandwidth"] == MAX_THROTTLE
    assert p.with_parameters({"downtime-limit": 50}).downtime_limit == 50
    with pytest.raises(ConfigError, match="downtime-limit"):
        p.with_parameters({"downtime-limit": 2_000_001})
    with pytest.raises(ConfigError, match="expected: integer"):
        p.with_parameters({"max-bandwidth": "fast"})
    with pytest.raises(ConfigError, match="unexpected"):
        p.with_parameters({"xbzrle-cache-size": 1})
    with pytest.raises(ConfigError, match="not supported"):
        p.with_capabilities([("postcopy-ram", True)])
    assert "multifd" in p.with_capabilities([("multifd", True)]).capabilities


@pytest.mark.parametrize("uri, scheme", [("tcp:127.0.0.1:4444", "tcp"), ("tcp::0", "tcp"),
                                         ("unix:/tmp/m.sock", "unix"), ("file:/tmp/x", "file"),
                                         ("exec:cat > /tmp/x", "exec")])
def test_uris(uri: str, scheme: str) -> None:
    assert parse_uri(uri).scheme == scheme


@pytest.mark.parametrize("uri", ["tcp:host", "tcp:h:99999", "rdma:1.2.3.4:5", "nonsense", "file:"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(ConfigError, match="Invalid migration URI"):
        parse_uri(uri)
