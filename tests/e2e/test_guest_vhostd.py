"""End to end: a QEMU guest's virtio-net served by vhostd, forwarding to a TAP.

vhostd runs as ``python -m vhostd --socket SOCK --tap TAP --netns NS`` (server mode:
QEMU is the vhost-user client); it creates the TAP inside the namespace, the test
gives the TAP 198.18.0.1/24. The guest (198.18.0.2/24) pings the TAP side,
downloads a >= 20 MB random file over HTTP and checks its sha256.

The daemon command can be overridden with VHOSTD_CMD (e.g. ".venv/bin/vhostd").
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import guest as g

TAP = "vhdtap0"


def vhostd_argv() -> list[str]:
    cmd = os.environ.get("VHOSTD_CMD")
    return shlex.split(cmd) if cmd else [sys.executable, "-m", "vhostd"]


class Vhostd(g.BackgroundProcess):
    """The daemon under test; stderr kept separately for failure messages."""

    def __init__(self, socket_path: str, netns: str, tap: str = TAP, control: str | None = None,
                 extra: tuple[str, ...] = (), logdir: str | None = None):
        argv = vhostd_argv() + ["--socket", socket_path, "--tap", tap, "--netns", netns]
        if control:
            argv += ["--control", control]
        argv += list(extra)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(g.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        super().__init__(argv, name="vhostd", env=env, cwd=str(g.REPO_ROOT),
                         logdir=logdir, merge_stderr=False)
        self.socket_path = socket_path

    def describe(self, lines: int = 60) -> str:
        state = "running" if self.alive() else f"exited rc={self.returncode}"
        return (f"--- vhostd ({state}): {shlex.join(self.argv)}\n"
                f"--- vhostd stderr, last {lines} lines ---\n{g.tail(self.stderr(), lines)}\n"
                f"--- vhostd stdout, last 10 lines ---\n{g.tail(self.output(), 10)}")


@pytest.fixture
def vhostd(netns, sock_dir):
    """Factory starting the daemon for the test's namespace; at teardown any
    daemon still running is killed (tests check the SIGTERM exit code themselves)."""
    started: list[Vhostd] = []

    def start(extra: tuple[str, ...] = ()) -> Vhostd:
        d = Vhostd(os.path.join(sock_dir, "vhostd.sock"), netns,
                   control=os.path.join(sock_dir, "vhostd.ctl"), extra=extra,
                   logdir=sock_dir)
        started.append(d)
        d.start()
        g.wait_for_socket(d.socket_path, timeout=30, proc=d)
        g.NetNS(netns).configure_tap(TAP, timeout=20, proc=d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.kill()


def _run_download(guest_image, daemon: Vhostd, srv: g.HttpFileServer, netns: str,
                  label: str, **qemu_kw) -> g.GuestResult:
    # (re)configure the TAP address: idempotent, and covers a daemon that
    # recreates its TAP between frontends
    g.NetNS(netns).configure_tap(TAP, timeout=10, proc=daemon)
    script = g.net_test_script(srv.url, srv.sha256, srv.size)
    result = g.run_guest(guest_image, daemon.socket_path, script, timeout=90, **qemu_kw)
    context = f"[{label}]\n" + daemon.describe()
    if not result.ok:
        context += "\n" + g.NetNS(netns).diagnostics(TAP)
    result.assert_ok(context)
    assert result.value("VHOSTD-SHA256") == srv.sha256, result.describe() + "\n" + context
    assert int(result.value("VHOSTD-DOWNLOAD-BYTES") or 0) >= 20 * 1024 * 1024
    print(f"\n[e2e] vhostd {label}: {result.value('VHOSTD-DOWNLOAD-BYTES')} bytes in "
          f"{result.value('VHOSTD-DOWNLOAD-SECONDS')}s = "
          f"{result.value('VHOSTD-DOWNLOAD-MBPS')} Mbit/s (guest run {result.elapsed:.1f}s)",
          file=sys.stderr)
    return result


def _stop_ok(daemon: Vhostd) -> None:
    rc = daemon.stop(signal.SIGTERM, timeout=15)
    assert rc == 0, f"vhostd exited with {rc} on SIGTERM\n{daemon.describe()}"


def test_guest_ping_download_sha256(guest_image, netns, vhostd, http_server):
    daemon = vhostd()
    srv = http_server()
    _run_download(guest_image, daemon, srv, netns, "run")
    assert daemon.alive(), "vhostd died during the guest run\n" + daemon.describe()
    _stop_ok(daemon)


def test_daemon_survives_guest_exit_and_serves_again(guest_image, netns, vhostd, http_server):
    daemon = vhostd()
    srv = http_server()
    _run_download(guest_image, daemon, srv, netns, "first frontend")
    # QEMU is gone: the daemon must stay up and listen again on the same socket
    time.sleep(1.0)
    assert daemon.alive(), "vhostd exited after QEMU disconnected\n" + daemon.describe()
    g.wait_for_socket(daemon.socket_path, timeout=10, proc=daemon)
    _run_download(guest_image, daemon, srv, netns, "second frontend", mac="52:54:00:12:34:57")
    assert daemon.alive(), "vhostd died during the second guest run\n" + daemon.describe()
    _stop_ok(daemon)


_VHOSTCTL = "import sys; from vhostd.cli import vhostctl_main; sys.exit(vhostctl_main(sys.argv[1:]))"
GUEST_MAC = "52:54:00:12:34:56"


def test_capture_of_a_guest_s_traffic(guest_image, netns, vhostd, http_server, sock_dir):
    """`vhostctl capture` while a real guest pings and downloads: the pcap holds the
    guest's echo requests as it sent them (tx), the replies and the HTTP data the
    TAP delivered to it (rx), cut at the snap length; the capture ends at its count
    and the guest's transfer is intact."""
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    daemon = vhostd()
    srv = http_server()
    out = os.path.join(sock_dir, "guest.pcap")
    env = dict(os.environ, PYTHONPATH=str(g.REPO_ROOT))
    cap = subprocess.Popen([sys.executable, "-c", _VHOSTCTL, "--control", os.path.join(sock_dir, "vhostd.ctl"),
                            "capture", TAP, "-c", "400", "-s", "128", "-w", out],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(g.REPO_ROOT))
    try:
        deadline = time.monotonic() + 20
        while "capture started" not in daemon.stderr():
            assert cap.poll() is None and time.monotonic() < deadline, cap.communicate()[1] + daemon.describe()
            time.sleep(0.1)
        _run_download(guest_image, daemon, srv, netns, "captured")
        _, err = cap.communicate(timeout=30)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    assert cap.returncode == 0, err
    assert "400 frame(s) captured" in err, err
    pkts = rdpcap(out)
    assert len(pkts) == 400
    assert all(len(bytes(p)) <= 128 for p in pkts)
    tx = [p for p in pkts if Ether in p and p[Ether].src == GUEST_MAC]
    rx = [p for p in pkts if Ether in p and p[Ether].dst == GUEST_MAC]
    requests = [p for p in tx if ICMP in p and p[ICMP].type == 8 and p[IP].src == g.GUEST_IP]
    replies = [p for p in rx if ICMP in p and p[ICMP].type == 0 and p[IP].dst == g.GUEST_IP]
    http = [p for p in rx if TCP in p and p[TCP].sport == srv.port]
    print(f"\n[e2e] capture: {len(pkts)} frames, {len(tx)} from the guest, {len(rx)} to it; "
          f"{len(requests)} echo requests, {len(replies)} replies, {len(http)} HTTP segments", file=sys.stderr)
    assert len(requests) >= 3 and len(replies) >= 3, [p.summary() for p in pkts[:20]]
    assert {p[ICMP].seq for p in replies} <= {p[ICMP].seq for p in requests}
    assert http, [p.summary() for p in pkts[-20:]]
    # each direction in time order
    ts = [float(p.time) for p in pkts]
    assert ts == sorted(ts)
    _stop_ok(daemon)
