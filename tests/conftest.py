"""Shared fixtures: network namespaces, a real vhostd process, TAP-side packet
sockets, guest memory for the doubles' self-tests.

Everything runs inside network namespaces the fixtures create; nothing is sent
anywhere else. Tests that need root (TAP, netns) skip with the reason printed
when run unprivileged; CI runs as root, so nothing skips there.

The one way a test imports the doubles and helpers: `from tests.driver import
...`, `from tests.daemon.traffic import ...`. This file puts the repository root on
sys.path for that, whatever directory pytest was started from.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.driver.guestmem import GuestMemory  # noqa: E402

ETH_P_ALL = 0x0003


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for TAP devices and network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")


@contextlib.contextmanager
def network_namespace():
    """A fresh network namespace (IPv6 off, so a TAP in it carries only what a test
    sends), deleted with every process left in it on exit. For fixtures of any scope."""
    need_root()
    name = f"vhd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        yield name
    finally:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def mem():
    """4 MiB of guest memory (a memfd) for the doubles' self-tests."""
    m = GuestMemory(4 << 20)
    yield m
    m.close()


@pytest.fixture
def netns():
    """A fresh network namespace (IPv6 off, so the TAP carries only what a test sends)."""
    with network_namespace() as name:
        yield name


class DaemonProcess:
    """`python -m vhostd` as a subprocess, with its stderr kept for failure messages."""

    def __init__(self, tmp: Path, netns: str | None, tap: str, *extra: str, loop: str = "uvloop",
                 client: bool = False):
        self.socket = str(tmp / f"{tap}.sock")
        self.control = str(tmp / f"{tap}.ctl")
        self.tap = tap
        self.netns = netns
        self.logfile = tmp / f"{tap}.log"
        cmd = [sys.executable, "-m", "vhostd", "--socket", self.socket, "--tap", tap,
               "--control", self.control, "-v", *extra]
        if netns:
            cmd += ["--netns", netns]
        if client:
            cmd.append("--client")
        self.client = client
        self._spawn(cmd, loop)

    @classmethod
    def from_config(cls, tmp: Path, config: Path, control: Path, loop: str | None = None) -> "DaemonProcess":
        """`python -m vhostd --config CONFIG` whose control socket (the file's `control`)
        is CONTROL; its output goes to TMP/daemon.log. loop=None leaves the event loop
        to vhostd's default. Not yet waited for: call wait_ready()."""
        d = cls.__new__(cls)
        d.socket = d.tap = d.netns = None
        d.client = False
        d.control = str(control)
        d.logfile = tmp / "daemon.log"
        d._spawn([sys.executable, "-m", "vhostd", "--config", str(config)], loop)
        return d

    def _spawn(self, cmd: list[str], loop: str | None) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if loop is not None:
            env["VHOSTD_EVENT_LOOP"] = loop
        self._log = open(self.logfile, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 15.0) -> "DaemonProcess":
        deadline = time.monotonic() + timeout
        target = self.control
        while not os.path.exists(target):
            if self.proc.poll() is not None:
                raise AssertionError(f"vhostd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vhostd not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        self._log.flush()
        return self.logfile.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"vhostd ignored SIGTERM for {timeout}s:\n{self.log()}")
        self._log.close()
        return self.proc.returncode


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


@pytest.fixture
def daemon(tmp_path, netns, loop_kind):
    """A started vhostd serving one port whose TAP lives in `netns`."""
    procs = []

    def start(*extra, tap="vtap0", client=False, wait=True):
        d = DaemonProcess(tmp_path, netns, tap, *extra, loop=loop_kind, client=client)
        procs.append(d)
        return d.wait_ready() if wait else d

    yield start
    for d in procs:
        rc = d.stop()
        assert rc == 0, f"vhostd exited with {rc} on SIGTERM:\n{d.log()}"


def packet_socket(netns: str, ifname: str, timeout: float = 3.0) -> socket.socket:
    """An AF_PACKET socket on `ifname` inside `netns` (sees what the TAP receives, sends into it)."""
    from pyroute2 import netns as pnetns

    pnetns.pushns(netns)
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, 0))
    finally:
        pnetns.popns()
    s.settimeout(timeout)
    return s


def recv_matching(sock: socket.socket, pred, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no matching frame arrived")
        sock.settimeout(left)
        data, addr = sock.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        if pred(data):
            return data
