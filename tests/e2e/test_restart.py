"""End to end: restarts on either side of the vhost-user socket, with a QEMU guest.

- vhostd killed with SIGKILL while the guest pings the host side of the TAP every
  0.1 s, then started again (at once, and the second time after 3 s), in both topologies: vhostd listening with QEMU's
  chardev `reconnect=1`, and vhostd `--client` with QEMU `server=on,wait=off`.
  Traffic resumes without the guest doing anything, and the TAP (persistent) keeps
  the address the test gave it once. Prints the pings lost per restart.
- QEMU killed with SIGKILL: vhostd unmaps and closes everything of that frontend
  (fd count and mappings back to what they were before it connected) and serves
  the next QEMU on the same socket.

Losses are printed, not asserted: only that traffic resumed within a generous
bound (TCG guests on a loaded 2-CPU machine are slow).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import guest as g
from test_guest_vhostd import TAP, Vhostd

PING_INTERVAL = 0.1
RESUME_BOUND_S = 90.0      # traffic must resume within this after the daemon restarts
BOOT_BOUND_S = 240.0       # guest boot + first replies under TCG
RESTART_DELAYS = (0.0, 3.0)  # restart 1 at once, restart 2 three seconds after the kill
RESTARTS = len(RESTART_DELAYS)

_REPLY = re.compile(r"seq=(\d+) ttl=\d+ time=([\d.]+) ms")


def ping_script(host: str = g.HOST_IP, count: int = 20000) -> str:
    """/test.sh: wait for the host, then ping it every PING_INTERVAL s, printing each reply."""
    return f"""#!/bin/sh
i=0
while [ $i -lt 120 ]; do
    if ping -c 1 -W 1 {host} >/dev/null 2>&1; then break; fi
    i=$((i+1))
done
echo "VHOSTD-PINGING"
ping -i {PING_INTERVAL} -c {count} -W 1 {host}
echo "VHOSTD-TEST-EXIT=0"
"""


def replies(qemu: g.Qemu) -> dict[int, float]:
    """seq -> round-trip time in ms of every reply the guest's ping printed (late ones too)."""
    return {int(seq): float(rtt) for seq, rtt in _REPLY.findall(qemu.log)}


def wait_replies(qemu: g.Qemu, n: int, timeout: float, context) -> dict[int, float]:
    deadline = time.monotonic() + timeout
    while True:
        seen = replies(qemu)
        if len(seen) >= n:
            return seen
        if not qemu.alive() or time.monotonic() > deadline:
            raise AssertionError(f"{len(seen)} ping replies, expected {n} within {timeout}s\n"
                                 f"{g.tail(qemu.log, 30)}\n{qemu.stderr}\n{context()}")
        time.sleep(0.2)


LATE_MS = 200.0  # a reply slower than this waited out the restart


def window(seen: dict[int, float], after: int, upto: int) -> tuple[int, int, float]:
    """(pings lost, replies later than LATE_MS, slowest reply in ms) of sequence numbers after+1..upto."""
    span = range(after + 1, upto + 1)
    lost = sum(1 for q in span if q not in seen)
    late = sum(1 for q in span if q in seen and seen[q] > LATE_MS)
    slowest = max((seen[q] for q in span if q in seen), default=0.0)
    return lost, late, slowest


class Daemons:
    """One vhostd after another on the same socket, TAP and control path."""

    def __init__(self, sock_dir: str, netns: str, extra: tuple[str, ...] = ()):
        self.sock_dir = sock_dir
        self.netns = netns
        self.extra = extra
        self.sock = os.path.join(sock_dir, "vm.sock")
        self.control = os.path.join(sock_dir, "vhostd.ctl")
        self.runs: list[Vhostd] = []

    def start(self) -> Vhostd:
        logdir = os.path.join(self.sock_dir, f"run{len(self.runs)}")
        os.makedirs(logdir)
        d = Vhostd(self.sock, self.netns, control=self.control,
                   extra=self.extra, logdir=logdir)
        self.runs.append(d)
        d.start()
        deadline = time.monotonic() + 30
        while not re.search(r"listening on|connecting to", d.stderr()):
            assert d.alive() and time.monotonic() < deadline, d.describe()
            time.sleep(0.05)
        return d

    @property
    def current(self) -> Vhostd:
        return self.runs[-1]

    def describe(self) -> str:
        out = [d.describe(40) for d in self.runs[-2:]]
        if self.runs and self.runs[-1].alive():
            for verb in ("ports", "stats"):
                r = subprocess.run([sys.executable, "-c", "import sys; from vhostd.cli import vhostctl_main; "
                                    "sys.exit(vhostctl_main(sys.argv[1:]))", "--control", self.control, verb,
                                    "--json"], capture_output=True, text=True, cwd=str(g.REPO_ROOT), timeout=20)
                out.append(f"--- vhostctl {verb} ---\n{r.stdout}{r.stderr}")
        return "\n".join(out)

    def kill_all(self) -> None:
        for d in self.runs:
            d.kill()


def _tap_address(ns: g.NetNS) -> str:
    return ns.exec(["ip", "-4", "-o", "addr", "show", "dev", TAP], check=False).stdout


def _restart_under_ping(guest_image, netns: str, sock_dir: str, client: bool, packed: bool = False) -> list[int]:
    topology = "vhostd --client, QEMU server=on" if client else "vhostd server, QEMU reconnect=1"
    if packed:
        topology += ", packed rings"
    ns = g.NetNS(netns)
    daemons = Daemons(sock_dir, netns, ("--client",) if client else ())
    qemu = None
    losses: list[int] = []
    try:
        daemons.start()
        ns.configure_tap(TAP, timeout=20, proc=daemons.current)  # once: the TAP is persistent
        qemu = g.Qemu(guest_image, daemons.sock, test_script=ping_script(), server=client,
                      reconnect=None if client else 1, device_opts=["packed=on"] if packed else []).start()
        seen = wait_replies(qemu, 20, BOOT_BOUND_S, daemons.describe)
        for r in range(1, RESTARTS + 1):
            last_before = max(seen)
            daemons.current.send_signal(signal.SIGKILL)
            daemons.current.proc.wait(10)
            killed_at = time.monotonic()
            assert f"{g.HOST_IP}/" in _tap_address(ns), "the TAP lost its address with the daemon"
            time.sleep(RESTART_DELAYS[r - 1])  # as a supervisor's restart delay would
            d = daemons.start()
            started_at = time.monotonic()
            # Replies the guest got before the kill are on the console by now (the
            # restart takes a second or more): a higher sequence number came through
            # the new daemon. Requests sent while no daemon ran wait in the guest's
            # TX ring and may still be answered (late, but not lost).
            mark = max(replies(qemu))
            deadline = started_at + RESUME_BOUND_S
            while max(replies(qemu)) <= mark:
                assert qemu.alive(), f"QEMU exited\n{g.tail(qemu.log, 30)}\n{qemu.stderr}"
                assert d.alive(), daemons.describe()
                assert time.monotonic() < deadline, (
                    f"restart {r} ({topology}): no ping reply within {RESUME_BOUND_S}s of the restart\n"
                    f"{g.tail(qemu.log, 30)}\n{daemons.describe()}\n{ns.diagnostics(TAP)}")
                time.sleep(0.05)
            resumed_at = time.monotonic()
            assert "(existing, attached)" in d.stderr(), d.describe()
            if packed:  # resumed from the saved positions, not from QEMU's stale base
                assert "resuming a packed ring" in d.stderr(), d.describe()
            seen = wait_replies(qemu, len(replies(qemu)) + 30, RESUME_BOUND_S, daemons.describe)
            # Every ping from the last reply before the kill on, but for the newest few
            # (their replies may still be on the way): no ping is lost while no
            # daemon restarts, so a missing one here is the restart's.
            upto = max(seen) - 10
            lost, late, slowest = window(seen, last_before, upto)
            losses.append(lost)
            print(f"\n[restart] {topology}: restart {r} (after {RESTART_DELAYS[r - 1]:.0f} s): {lost} pings lost, {late} answered late "
                  f"(slowest {slowest:.0f} ms) of seq {last_before + 1}..{upto}; new replies "
                  f"{resumed_at - killed_at:.1f} s after the SIGKILL, {resumed_at - started_at:.1f} s after "
                  "the new daemon was serving", file=sys.stderr)
        assert f"{g.HOST_IP}/" in _tap_address(ns)
        rc = daemons.current.stop(signal.SIGTERM, timeout=15)
        assert rc == 0, f"vhostd exited with {rc} on SIGTERM\n{daemons.describe()}"
    finally:
        if qemu is not None:
            qemu.cleanup()
        daemons.kill_all()
    print(f"[restart] {topology}: pings lost per restart: {losses}", file=sys.stderr)
    return losses


def test_vhostd_sigkill_and_restart_as_server_qemu_reconnects(guest_image, netns, sock_dir):
    losses = _restart_under_ping(guest_image, netns, sock_dir, client=False)
    assert len(losses) == RESTARTS and all(0 <= n < RESUME_BOUND_S / PING_INTERVAL * 2 for n in losses), losses


def test_vhostd_sigkill_and_restart_as_client_of_qemu_server(guest_image, netns, sock_dir):
    losses = _restart_under_ping(guest_image, netns, sock_dir, client=True)
    assert len(losses) == RESTARTS and all(0 <= n < RESUME_BOUND_S / PING_INTERVAL * 2 for n in losses), losses


def test_packed_rings_vhostd_sigkill_and_restart_as_server_qemu_reconnects(guest_image, netns, sock_dir):
    # QEMU 7.2 resends a packed ring's positions of its last clean stop only: the
    # restarted daemon resumes from the positions its predecessor saved
    losses = _restart_under_ping(guest_image, netns, sock_dir, client=False, packed=True)
    assert len(losses) == RESTARTS and all(0 <= n < RESUME_BOUND_S / PING_INTERVAL * 2 for n in losses), losses


def test_packed_rings_vhostd_sigkill_and_restart_as_client_of_qemu_server(guest_image, netns, sock_dir):
    losses = _restart_under_ping(guest_image, netns, sock_dir, client=True, packed=True)
    assert len(losses) == RESTARTS and all(0 <= n < RESUME_BOUND_S / PING_INTERVAL * 2 for n in losses), losses


# --- QEMU killed ----------------------------------------------------------------------

def fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def file_mappings(pid: int) -> list[str]:
    """Mappings backed by a file (memfd, shared memory, libraries), sorted, with sizes."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and not parts[5].startswith("["):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append(f"{parts[5].strip()} {hi - lo:#x}")
    return sorted(out)


def _wait_log_count(d: Vhostd, pattern: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, d.stderr())) < n:
        assert d.alive() and time.monotonic() < deadline, d.describe()
        time.sleep(0.1)


def test_qemu_sigkill_releases_everything_and_the_next_qemu_is_served(guest_image, netns, sock_dir):
    ns = g.NetNS(netns)
    daemons = Daemons(sock_dir, netns)
    qemus: list[g.Qemu] = []
    try:
        d = daemons.start()
        ns.configure_tap(TAP, timeout=20, proc=d)
        time.sleep(1.0)  # settle: housekeeping started, first imports done
        fds_before, maps_before = fds(d.pid), file_mappings(d.pid)
        for run in (1, 2):
            q = g.Qemu(guest_image, daemons.sock, test_script=ping_script(), mac=f"52:54:00:12:34:{0x70 + run:02x}")
            qemus.append(q.start())
            wait_replies(q, 10, BOOT_BOUND_S, daemons.describe)
            during = file_mappings(d.pid)
            assert any("memfd:" in m for m in during), "guest memory should be mapped while QEMU is connected"
            assert len(fds(d.pid)) > len(fds_before)
            os.killpg(q.proc.pid, signal.SIGKILL)
            q.proc.wait(10)
            _wait_log_count(d, r"frontend disconnected|frontend connection lost|closing connection", run)
            time.sleep(0.5)
            fds_after, maps_after = fds(d.pid), file_mappings(d.pid)
            print(f"\n[restart] QEMU SIGKILL {run}: daemon fds {len(fds_before)} before the connection, "
                  f"{len(fds_after)} after; file mappings {len(maps_before)} -> {len(during)} (connected) -> "
                  f"{len(maps_after)}", file=sys.stderr)
            assert fds_after == fds_before, f"fds left: {set(fds_after.items()) ^ set(fds_before.items())}"
            assert maps_after == maps_before, f"mappings left: {sorted(set(maps_after) ^ set(maps_before))}"
            assert d.alive(), d.describe()
        assert d.stderr().count("memory region added: gpa 0x0 ") >= 2, d.describe()  # QEMU's ADD_MEM_REG
        rc = d.stop(signal.SIGTERM, timeout=15)
        assert rc == 0, d.describe()
    finally:
        for q in qemus:
            q.cleanup()
        daemons.kill_all()
