"""End to end: a generated pairwise (all-pairs) matrix over QEMU's virtio-net-pci
offload and ring properties. Each row is one guest that downloads a file over
HTTP and pushes a random one back with nc; both are checked by sha256 on the
receiving end. Feature sets with broken offload dependencies (e.g. csum=off with
host_tso4=on) are among the rows on purpose: vhostd must serve them.

The rows come from tests/e2e/pairwise.py (7 rows cover every on/off pair of the
14 properties). A row QEMU itself refuses to start is not a guest configuration:
QEMU_REFUSES says which by rule, and the generator covers their pairs otherwise."""
from __future__ import annotations

import sys

import pytest

from pairwise import all_pairs
from test_guest_features import bulk_script, env, go  # noqa: F401  (env is a fixture)

MiB = 1024 * 1024
OPTIONS = ["csum", "guest_csum", "host_tso4", "host_tso6", "guest_tso4", "guest_tso6", "guest_ecn",
           "host_ecn", "guest_ufo", "host_ufo", "mrg_rxbuf", "event_idx", "indirect_desc", "packed"]


def QEMU_REFUSES(row: dict[str, bool]) -> bool:
    """QEMU 7.2 starts every generated row (each boots in this test); this is the
    one place to encode a refusal by rule should another QEMU version add one."""
    return False


ROWS, UNCOVERABLE = all_pairs(OPTIONS, allowed=lambda r: not QEMU_REFUSES(r))


def props(row: dict[str, bool]) -> list[str]:
    return [f"{k}={'on' if v else 'off'}" for k, v in row.items()]


@pytest.mark.parametrize("row", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_option_row_carries_traffic_both_ways(guest_image, env, http_server, row):  # noqa: F811
    assert not UNCOVERABLE
    env.start()
    srv = http_server(size=4 * MiB + 123)
    env.sink(1)
    script = bulk_script(srv.url, srv.sha256, srv.size, up_mib=4)
    opts = props(row)
    q = env.qemu(guest_image, test_script=script, device_opts=opts)
    try:
        q.start()
        assert q.wait_for(r"VHOSTD-WAIT=go1", 90), f"{opts}: guest never got ready\n" + env.context(q)
        go(srv, "go1")
        assert q.wait_for(r"VHOSTD-WAIT=go2", 120), f"{opts}: download failed\n" + env.context(q)
        go(srv, "go2")
        result = q.wait(120)
    finally:
        q.cleanup()
    result.assert_ok(f"{opts}\n" + env.context(q))
    assert result.value("VHOSTD-DL-SHA256") == srv.sha256
    assert env.daemon.alive(), env.context()
    print(f"\n[e2e] matrix {','.join(opts)}: guest run {result.elapsed:.1f}s", file=sys.stderr)
