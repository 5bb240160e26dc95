"""End to end: DPDK's virtio-user frontend (dpdk-testpmd, no VM) against vhostd.

A second, independent real vhost-user client: DPDK's net_virtio_user PMD speaks
the protocol from its own code base (SET_VRING_CALL before SET_FEATURES,
PROTOCOL_F_STATUS, packed rings, in-order, queue pairs), and its counters are
exact, so every frame can be accounted for:

* guest->TAP: ``txonly`` for about a second; then testpmd's TX-packets ==
  vhostd's tx packets (+ tx drops) == the TAP's rx_packets in the namespace,
  bytes alike; with 2 queue pairs both tx queues must have carried frames.
* TAP->guest: ``rxonly``; a known number of frames (64 UDP flows) is written
  into the TAP through an AF_PACKET socket at a moderate rate; then
  frames sent == TAP tx_packets == vhostd rx packets == testpmd RX-packets.

testpmd runs interactively (``-i``) under ``stdbuf -o0`` (its command output is
stdio-buffered otherwise) and is driven through its prompt. Its forwarding lcore
busy-polls a CPU, so each phase is kept short.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import guest as g
from test_guest_features import TAP, Counters, Env

from bench.testpmd import PromptError, PromptReader, parse_port_stats
RX_FRAMES = 10000
RX_FLOWS = 64
RX_FRAME_LEN = 88


@pytest.fixture(scope="module")
def testpmd(e2e_host):
    if g.ensure_apt_packages({"dpdk-testpmd": "dpdk-dev", "stdbuf": "coreutils"}):
        pytest.fail("dpdk-testpmd (dpdk-dev) is needed and could not be installed")
    return "dpdk-testpmd"


@pytest.fixture
def env(netns, sock_dir):
    e = Env(netns, sock_dir)
    try:
        yield e
    finally:
        e.cleanup()


class TestPmd:
    """dpdk-testpmd with a net_virtio_user port, driven through its prompt."""

    __test__ = False  # not a pytest test class

    def __init__(self, sock: str, prefix: str, *, queues: int = 1, packed_vq: int = 0,
                 mrg_rxbuf: int = 1, in_order: int = 0, logdir: str | None = None):
        vdev = (f"net_virtio_user0,path={sock},queues={queues},queue_size=256,"
                f"packed_vq={packed_vq},mrg_rxbuf={mrg_rxbuf},in_order={in_order}")
        self.argv = ["stdbuf", "-o0", "dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "1024",
                     "--no-pci", f"--file-prefix={prefix}", "--vdev", vdev,
                     "--", "-i", "--total-num-mbufs=8192"]
        if queues > 1:
            self.argv += [f"--rxq={queues}", f"--txq={queues}"]
        self.runtime_dir = f"/var/run/dpdk/{prefix}"  # EAL's files for this --file-prefix
        self.log_path = os.path.join(logdir or "/tmp", f"testpmd-{prefix}.log")
        self.proc: subprocess.Popen | None = None
        self._out: PromptReader | None = None
        self._log = None

    def start(self, timeout: float = 60) -> str:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=g._set_pdeathsig)
        self._log = open(self.log_path, "wb", buffering=0)
        self._out = PromptReader(self.proc.stdout.fileno(), self._to_log)
        return self._until_prompt(timeout)

    def _to_log(self, chunk: bytes) -> None:
        if chunk:
            self._log.write(chunk)
        else:  # end of output
            self._log.close()

    def _until_prompt(self, timeout: float) -> str:
        try:
            return self._out.until_prompt(timeout)
        except PromptError as exc:
            raise AssertionError(f"testpmd {exc}\n{self.describe()}") from None

    def cmd(self, line: str, timeout: float = 30) -> str:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt(timeout)

    def port_stats(self) -> dict[str, int]:
        out = self.cmd("show port stats 0")
        try:
            return parse_port_stats(out)
        except ValueError as exc:
            raise AssertionError(str(exc)) from None

    def quit(self, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
            return self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            g._kill_group(self.proc, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def describe(self, lines: int = 40) -> str:
        text = self._out.text() if self._out is not None else ""
        state = "running" if self.proc and self.proc.poll() is None else \
            f"exited rc={self.proc.returncode if self.proc else None}"
        return (f"--- testpmd ({state}): {' '.join(self.argv)}\n"
                f"--- testpmd output, last {lines} lines ---\n{g.tail(text, lines)}")


def wait_stable(env: Env, direction: str, target: int | None = None,
                timeout: float = 10) -> Counters:
    """Polls vhostd's counters until ``direction`` packets + drops stop moving
    (three equal reads in a row) or reach ``target``; returns the last snapshot."""
    deadline = time.monotonic() + timeout
    last, same = None, 0
    while True:
        c = env.counters()
        v = c.get(direction, "packets") + c.get(direction, "drops")
        if target is not None and v >= target:
            return c
        same = same + 1 if v == last else 0
        last = v
        if same >= 2 or time.monotonic() > deadline:
            return c
        time.sleep(0.1)


_SEND = r"""
import socket, struct, sys, time
ifname, count, flows, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = bytes.fromhex(open(f"/sys/class/net/{ifname}/address").read().strip().replace(":", ""))
dst = bytes.fromhex("525400123456")

def csum(b):
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16:
        t = (t >> 16) + (t & 0xffff)
    return ~t & 0xffff

frames = []
for f in range(flows):
    payload = b"vhostd-dpdk-rx".ljust(length - 14 - 20 - 8, b"\0")
    udp = struct.pack("!HHHH", 20000 + f, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), f, 0x4000, 64, 17, 0,
                     socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2"))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    frames.append(dst + src + b"\x08\x00" + ip + udp)
sent = 0
while sent < count:
    # bursts of 32 with a pause: ~30k frames/s, far below what the TAP queue holds
    for _ in range(min(32, count - sent)):
        s.send(frames[sent % flows])
        sent += 1
    time.sleep(0.001)
print(sent)
"""

VARIANTS = [
    pytest.param(1, 0, 1, 0, id="q1-split-mrg"),
    pytest.param(1, 0, 0, 0, id="q1-split-nomrg"),
    pytest.param(1, 1, 1, 0, id="q1-packed-mrg"),
    pytest.param(1, 1, 0, 0, id="q1-packed-nomrg"),
    pytest.param(1, 0, 1, 1, id="q1-split-mrg-inorder"),
    pytest.param(1, 1, 0, 1, id="q1-packed-nomrg-inorder"),
    pytest.param(2, 0, 1, 0, id="q2-split-mrg"),
    pytest.param(2, 1, 0, 1, id="q2-packed-nomrg-inorder"),
]


@pytest.mark.parametrize("queues,packed_vq,mrg_rxbuf,in_order", VARIANTS)
def test_virtio_user_tx_rx(testpmd, env, queues, packed_vq, mrg_rxbuf, in_order):
    extra = ("--queues", str(queues)) if queues > 1 else ()
    env.start(*extra, address=False)
    pmd = TestPmd(env.sock, f"vu-{env.ns.name}", queues=queues, packed_vq=packed_vq,
                  mrg_rxbuf=mrg_rxbuf, in_order=in_order, logdir=env.sock_dir)
    env.procs.append(pmd)
    label = f"queues={queues} packed_vq={packed_vq} mrg_rxbuf={mrg_rxbuf} in_order={in_order}"
    try:
        pmd.start()
        fe = env.frontend()
        names = set(fe["feature_names"])
        assert ("RING_PACKED" in names) == bool(packed_vq), sorted(names)
        assert ("MRG_RXBUF" in names) == bool(mrg_rxbuf), sorted(names)
        assert ("MQ" in names) == (queues > 1), sorted(names)
        assert fe["queue_pairs_enabled"] == queues, fe

        # ---- guest -> TAP: txonly ------------------------------------------------
        pmd.cmd("set fwd txonly")
        c0, t0 = env.counters(), env.tap_stats()
        pmd.cmd("clear port stats all")
        pmd.cmd("start")
        time.sleep(1.0)
        pmd.cmd("stop")
        ps = pmd.port_stats()
        c1 = wait_stable(env, "tx", target=c0.get("tx", "packets") + c0.get("tx", "drops")
                         + ps["tx_packets"])
        c1 = wait_stable(env, "tx")  # nothing beyond what testpmd counted may show up
        t1 = env.tap_stats()
        tx_p, tx_b = c1.frames(c0, "tx")
        tx_drops = c1.delta(c0, "tx", "drops")
        tap_rx = t1["rx"]["packets"] - t0["rx"]["packets"]
        tap_rx_b = t1["rx"]["bytes"] - t0["rx"]["bytes"]
        per_q = [c1.delta(c0, "tx", "packets", qp) for qp in range(queues)]
        print(f"\n[e2e] virtio-user {label}: features {' '.join(sorted(names))}", file=sys.stderr)
        print(f"[e2e] virtio-user {label}: txonly {ps['tx_packets']} frames in ~1s "
              f"(vhostd tx {tx_p} + {tx_drops} dropped, per queue {per_q}; TAP rx {tap_rx})",
              file=sys.stderr)
        ctx = f"[{label}] testpmd {ps}\n" + env.context()
        assert ps["tx_packets"] > 1000, "testpmd hardly sent anything\n" + ctx
        assert ps["tx_packets"] == tx_p + tx_drops, (
            f"testpmd sent {ps['tx_packets']}, vhostd accounted {tx_p} + {tx_drops} dropped\n" + ctx)
        assert tap_rx == tx_p, f"vhostd wrote {tx_p} frames, the TAP received {tap_rx}\n" + ctx
        assert tx_drops == 0, ctx
        assert ps["tx_bytes"] == tx_b == tap_rx_b, (ps["tx_bytes"], tx_b, tap_rx_b, ctx)
        assert all(p > 0 for p in per_q), f"a tx queue carried nothing: {per_q}\n" + ctx

        # ---- TAP -> guest: rxonly ------------------------------------------------
        pmd.cmd("set fwd rxonly")
        pmd.cmd("clear port stats all")
        pmd.cmd("start")
        c2, t2 = env.counters(), env.tap_stats()
        r = env.ns.exec([sys.executable, "-c", _SEND, TAP, str(RX_FRAMES), str(RX_FLOWS),
                         str(RX_FRAME_LEN)], check=False, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == str(RX_FRAMES), (r.stdout, r.stderr)
        c3 = wait_stable(env, "rx", target=c2.get("rx", "packets") + c2.get("rx", "drops")
                         + RX_FRAMES)
        c3 = wait_stable(env, "rx")
        time.sleep(0.2)  # the PMD polls: let it pick up the last used entries
        pmd.cmd("stop")
        ps = pmd.port_stats()
        t3 = env.tap_stats()
        rx_p, rx_b = c3.frames(c2, "rx")
        rx_drops = c3.delta(c2, "rx", "drops")
        tap_tx = t3["tx"]["packets"] - t2["tx"]["packets"]
        tap_tx_drop = t3["tx"]["dropped"] - t2["tx"]["dropped"]
        per_q = [c3.delta(c2, "rx", "packets", qp) for qp in range(queues)]
        print(f"[e2e] virtio-user {label}: rxonly, {RX_FRAMES} frames sent into the TAP: TAP tx "
              f"{tap_tx} (+{tap_tx_drop} dropped), vhostd rx {rx_p} (+{rx_drops} dropped, "
              f"per queue {per_q}), testpmd RX {ps['rx_packets']}", file=sys.stderr)
        ctx = f"[{label}] testpmd {ps}\n" + env.context()
        assert tap_tx == RX_FRAMES and tap_tx_drop == 0, "the TAP did not take every frame\n" + ctx
        assert rx_p == RX_FRAMES and rx_drops == 0, (
            f"vhostd delivered {rx_p} of {RX_FRAMES} frames ({rx_drops} dropped)\n" + ctx)
        assert ps["rx_packets"] == RX_FRAMES, (
            f"testpmd received {ps['rx_packets']} of {RX_FRAMES} frames\n" + ctx)
        assert ps["rx_bytes"] == rx_b == RX_FRAMES * RX_FRAME_LEN, (ps["rx_bytes"], rx_b, ctx)
        assert ps["rx_missed"] == 0 and ps["rx_errors"] == 0 and ps["rx_nombuf"] == 0, ctx
        # 64 flows: the TAP's flow steering spreads them over both queues
        assert all(p > 0 for p in per_q), f"an rx queue carried nothing: {per_q}\n" + ctx
    finally:
        rc = pmd.quit()
    assert env.daemon.alive(), "vhostd died\n" + env.context()
    assert rc == 0, f"testpmd exited rc={rc}\n{pmd.describe()}"
