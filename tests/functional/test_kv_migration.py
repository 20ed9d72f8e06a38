"""The kv guest serves a client without losing an acknowledged write across a live migration."""

from __future__ import annotations

import threading
import time

from confmig.bench.kv_client import KvClient
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
        client = KvClient(src_sock)
        stop = threading.Event()
        moved = threading.Event()
        puts = {"before": 0, "after": 0}
        errors: list[BaseException] = []

        def load() -> None:
            i = 0
            try:
                while not stop.is_set():
                    try:
                        client.put(f"key{i % 300}".encode(), f"value{i}".encode())
                        puts["after" if moved.is_set() else "before"] += 1
                        i += 1
                    except (ConnectionError, TimeoutError, OSError):
                        client.reconnect(dst_sock)  # the source stopped serving: follow the VM
                        moved.set()
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        worker = threading.Thread(target=load)
        worker.start()
        while puts["before"] < 200:
            time.sleep(0.01)
        result = migrate(src, dst, settings=MigrationSettings())
        deadline = time.monotonic() + 60
        while puts["after"] < 200 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        worker.join(30)
        assert not errors, errors
        assert result.status == "completed"
        assert puts["after"] >= 200, "the client never got service from the target"
        check = client.verify()
        assert check.ok, f"lost acknowledged writes: {check.mismatched[:5]}"
        assert check.keys == 300
        assert client.longest_gap < 10.0
        assert "PASS" in dst.selfcheck()
        client.close()
