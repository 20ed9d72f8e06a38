"""The kv guest serves a client without losing an acknowledged write across a live migration."""

from __future__ import annotations

from kv_load import KvLoad

from confmig.bench.lab import WORKLOAD_READY_RE, Lab
from confmig.bench.scenario import MigrationSettings, migrate


def test_kv_client_keeps_every_acknowledged_write_across_migration() -> None:
    with Lab() as lab:
        a, b = lab.host("hostA"), lab.host("hostB")
        src_sock, dst_sock = str(lab.root / "kv-src.sock"), str(lab.root / "kv-dst.sock")
        src = lab.vm("src", a, ram="64M", guest="kv",
                     extra=["-device", f"confmig-kv,path={src_sock}"])
        dst = lab.vm("dst", b, ram="64M", guest="kv", incoming="defer",
                     extra=["-device", f"confmig-kv,path={dst_sock}"])
        src.wait_console(WORKLOAD_READY_RE)
        load = KvLoad(src_sock, dst_sock)
        load.start()
        result = migrate(src, dst, settings=MigrationSettings())
        load.finish()
        client, errors, puts = load.client, load.errors, load.puts
        assert not errors, errors
        assert result.status == "completed"
        assert puts["after"] >= 200, "the client never got service from the target"
        check = client.verify()
        assert check.ok, f"lost acknowledged writes: {check.mismatched[:5]}"
        assert check.keys == 300
        assert client.longest_gap < 10.0
        assert "PASS" in dst.selfcheck()
        client.close()
