"""systemd integration: the units in systemd/, the daemon's side of the service
manager's protocols, and scripts/install-service.sh.

- The units pass `systemd-analyze verify` (vhostd.service and the template as
  vhostd@vm1.service) and keep the settings the integration relies on.
- sd_notify (sd_notify(3), systemd.service Type=notify) over a real AF_UNIX
  datagram socket, path and abstract: READY=1 + STATUS= once the port accepts
  frontends, WATCHDOG=1 at half of $WATCHDOG_USEC (only for $WATCHDOG_PID),
  RELOADING=1 ... READY=1 around SIGHUP with --config, STOPPING=1 and exit 0 on
  SIGTERM; every datagram comes from the main PID (NotifyAccess=main).
- --fd N: an inherited listening socket (systemd socket activation, libvirt);
  --print-capabilities (vhost-user "Backend program conventions").
- The units' sandbox, emulated without a service manager (this host's PID 1 is
  not systemd): the unit's User/Group (uid 65534 stands in for vhostd), UMask,
  capability sets, NoNewPrivileges, SystemCallFilter, SystemCallErrorNumber,
  RestrictAddressFamilies, RestrictNamespaces and MemoryDenyWriteExecute,
  applied with setpriv(1) and libseccomp the way systemd 252 applies them; the
  daemon serves a guest's frames through it. Not emulated: the mount
  namespace (ProtectSystem= and friends) and the device cgroup.
- install-service.sh into DESTDIR.

Daemons run with their TAPs inside network namespaces the tests create.
"""
from __future__ import annotations

import ctypes
import errno
import grp
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, need_root, packet_socket, recv_matching
from tests.driver import constants as C
from tests.driver.frontend import Frontend

UNITS = ROOT / "systemd"
INSTALL = ROOT / "scripts" / "install-service.sh"
EXAMPLE = UNITS / "vhostd.toml.example"
SANDBOX_UID = 65534  # stands in for the units' User=vhostd


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture
def rundir():
    """A short directory in /tmp for sockets (sun_path is 108 bytes), like /run/vhostd."""
    d = Path(tempfile.mkdtemp(prefix="vhd-sd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- the notify socket (the service manager's end) -------------------------------------

class NotifySocket:
    """What systemd binds at $NOTIFY_SOCKET: datagrams of KEY=VALUE lines, with the
    sender's credentials (SO_PASSCRED) so that NotifyAccess=main can be checked."""

    def __init__(self, path: Path | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if path is None:
            name = f"vhostd-test-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.seen: list[tuple[int, list[str]]] = []  # (sender pid, lines)

    def recv(self, timeout: float) -> tuple[int, list[str]] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            return None
        pid = 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        msg = (pid, data.decode().splitlines())
        self.seen.append(msg)
        return msg

    def wait_for(self, line: str, daemon: "Daemon", timeout: float = 15.0) -> list[str]:
        """Datagrams until one has `line` (a full line, or a prefix ending in '=');
        returns that datagram's lines. Fails if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} after {timeout}s; got {self.seen}\n{daemon.log()}")
            msg = self.recv(min(left, 0.2))
            if msg is None:
                if daemon.proc.poll() is not None:
                    raise AssertionError(f"vhostd exited with {daemon.proc.returncode} before {line!r}; "
                                         f"got {self.seen}\n{daemon.log()}")
                continue
            pid, lines = msg
            assert pid == daemon.proc.pid, f"notification {lines} from pid {pid}, not the main pid {daemon.proc.pid}"
            if any(l == line or (line.endswith("=") and l.startswith(line)) for l in lines):
                return lines

    def drain(self, seconds: float) -> list[list[str]]:
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None:
                out.append(msg[1])
        return out

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """vhostd started the way a service manager starts it: its environment,
    exec'd in place (the pid we hold is the daemon's: $MAINPID, $WATCHDOG_PID)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, pass_fds=(), prefix=(),
                 watchdog_pid_self: bool = False):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
        env = {**base, "PYTHONPATH": str(ROOT), **env}
        cmd = [*prefix, *argv]
        if watchdog_pid_self:
            # As systemd does: WATCHDOG_PID is the pid that execs the daemon.
            cmd = ["/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"', *cmd]
        self.logfile = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     pass_fds=pass_fds)

    def log(self) -> str:
        self._log.flush()
        return self.logfile.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"vhostd still running after {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def vhostd_argv() -> list[str]:
    return [sys.executable, "-m", "vhostd"]


def start(daemons, rundir, args, notify: NotifySocket | None, loop="uvloop", **kw) -> Daemon:
    env = {"VHOSTD_EVENT_LOOP": loop}
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.env
    env.update(kw.pop("env", {}))
    d = Daemon([*kw.pop("argv", vhostd_argv()), *args], env, rundir / f"vhostd-{len(daemons)}.log", **kw)
    daemons.append(d)
    return d


def assert_features(path: str) -> None:
    with Frontend.connect(path, timeout=10) as fe:
        features = fe.get_features()
    assert features & (1 << C.VIRTIO_F_VERSION_1), f"GET_FEATURES {features:#x} lacks VERSION_1"


# --- units --------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (a key may repeat), continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_units_keep_the_settings_the_integration_relies_on():
    common = {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
        "RuntimeDirectory": ["vhostd"], "RuntimeDirectoryPreserve": ["yes"], "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
        "SystemCallArchitectures": ["native"], "DevicePolicy": ["closed"], "DeviceAllow": ["/dev/net/tun rw"],
        "MemoryDenyWriteExecute": ["yes"], "UMask": ["0117"], "Group": ["kvm"],
    }
    svc = parse_unit(UNITS / "vhostd.service")["Service"]
    tpl = parse_unit(UNITS / "vhostd@.service")["Service"]
    for unit, s in (("vhostd.service", svc), ("vhostd@.service", tpl)):
        for key, want in common.items():
            assert s.get(key) == want, f"{unit}: {key}={s.get(key)}, expected {want}"
        assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"], unit
        assert "CAP_NET_ADMIN" in s["CapabilityBoundingSet"][0].split(), unit
    assert svc["ExecStart"] == ["/usr/local/bin/vhostd --config /etc/vhostd/vhostd.toml "
                                "--control /run/vhostd/control.sock --control-mode 0600"]
    # synchronous: fails when the file is broken or a port cannot be set up
    assert svc["ExecReload"] == ["/usr/local/bin/vhostctl --control /run/vhostd/control.sock reload"]
    assert set(svc["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}  # netns ports
    assert tpl["ExecStart"][0].startswith(
        "/usr/local/bin/vhostd --socket /run/vhostd/%i.sock --tap %i --control /run/vhostd/%i.ctl --control-mode 0600")
    assert tpl["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]  # no netns by default: no setns
    assert "ExecReload" not in tpl  # nothing to reload without --config
    for unit, s in (("vhostd.service", svc), ("vhostd@.service", tpl)):
        assert s["SystemCallFilter"][-1] == "sched_setaffinity", unit  # cpu_affinity, after the denials
        assert int(s["LimitNOFILE"][0]) >= 65536, unit
    # socket activation: the template's socket is the path vhostd@'s --socket names
    tsock = parse_unit(UNITS / "vhostd@.socket")["Socket"]
    assert tsock["ListenStream"] == ["/run/vhostd/%i.sock"] and tsock["Service"] == ["vhostd@%i.service"]
    ssock = parse_unit(UNITS / "vhostd.socket")["Socket"]
    example_sockets = re.findall(r'^socket = "([^"]+)"', EXAMPLE.read_text(), flags=re.M)
    assert ssock["ListenStream"] == example_sockets and ssock["Service"] == ["vhostd.service"]
    for s in (tsock, ssock):
        assert (s["SocketUser"], s["SocketGroup"], s["SocketMode"]) == (["vhostd"], ["kvm"], ["0660"])


def test_units_pass_systemd_analyze_verify(tmp_path):
    tool = need_tool("systemd-analyze")
    # verify insists that ExecStart= names an executable: a real vhostd entry point.
    wrapper = tmp_path / "vhostd"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m vhostd \"$@\"\n")
    wrapper.chmod(0o755)
    ctl = tmp_path / "vhostctl"  # ExecReload's
    ctl.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m vhostd.ctl \"$@\"\n")
    ctl.chmod(0o755)
    for name in ("vhostd.service", "vhostd@.service", "vhostd.socket", "vhostd@.socket"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/vhostctl", str(ctl))
        text = text.replace("/usr/local/bin/vhostd", str(wrapper))
        (tmp_path / name).write_text(text)
    r = subprocess.run([tool, "verify", str(tmp_path / "vhostd.service"), str(tmp_path / "vhostd@vm1.service"),
                        str(tmp_path / "vhostd.socket"), str(tmp_path / "vhostd@vm1.socket")],
                       capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    print(f"systemd-analyze verify (exit {r.returncode}):\n{out or '(no output)'}")
    ours = [l for l in out.splitlines() if str(tmp_path) in l or "vhostd" in l]
    assert r.returncode == 0 and not ours, "\n".join(ours) or out
    assert subprocess.run([str(wrapper), "--version"], capture_output=True).returncode == 0


def test_units_security_exposure_is_low():
    tool = need_tool("systemd-analyze")
    for name in ("vhostd.service", "vhostd@.service"):
        r = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(UNITS / name)],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
        if m is None:
            pytest.skip(f"this systemd-analyze has no offline security analysis: {r.stderr.strip()[:200]}")
        print(f"{name}: exposure {m.group(1)}")
        assert float(m.group(1)) <= 2.5, r.stdout


# --- sd_notify ----------------------------------------------------------------------

def test_notify_ready_watchdog_stopping(rundir, netns, loop_kind, daemons):
    notify = NotifySocket(rundir / "notify")
    sock = str(rundir / "vm1.sock")
    d = start(daemons, rundir, ["--socket", sock, "--tap", "vsd0", "--netns", netns,
                                "--control", str(rundir / "vm1.ctl")], notify, loop=loop_kind,
              env={"WATCHDOG_USEC": "200000"}, watchdog_pid_self=True)
    lines = notify.wait_for("READY=1", d)
    status = [l for l in lines if l.startswith("STATUS=")]
    assert status == ["STATUS=serving 1 port(s)"], lines
    assert_features(sock)  # ready means a frontend can connect now (Type=notify ordering)

    pings = [m for m in notify.drain(1.5) if "WATCHDOG=1" in m]
    assert len(pings) >= 5, f"{len(pings)} WATCHDOG=1 in 1.5 s at WATCHDOG_USEC=200000; got {notify.seen}"

    d.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", d)
    assert d.wait() == 0, d.log()
    assert not os.path.exists(sock), "the daemon leaves its socket behind"


def test_no_watchdog_for_another_pid(rundir, netns, daemons):
    notify = NotifySocket(rundir / "notify")
    d = start(daemons, rundir, ["--socket", str(rundir / "vm1.sock"), "--tap", "vsd0", "--netns", netns,
                                "--control", ""], notify,
              env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    notify.wait_for("READY=1", d)
    pings = [m for m in notify.drain(0.8) if "WATCHDOG=1" in m]
    assert not pings, "WATCHDOG=1 although $WATCHDOG_PID names another process"
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()


def write_config(path: Path, rundir: Path, netns: str, ports: list[str]) -> None:
    text = f'control = "{rundir}/control.sock"\n'
    for name in ports:
        text += f'[[port]]\nname = "{name}"\nsocket = "{rundir}/{name}.sock"\ntap = "{name}"\nnetns = "{netns}"\n'
    path.write_text(text)


def test_reload_with_config_notifies_reloading_then_ready(rundir, netns, daemons):
    notify = NotifySocket(rundir / "notify")
    conf = rundir / "vhostd.toml"
    write_config(conf, rundir, netns, ["vsd1"])
    d = start(daemons, rundir, ["--config", str(conf)], notify)
    assert "STATUS=serving 1 port(s)" in notify.wait_for("READY=1", d)

    write_config(conf, rundir, netns, ["vsd1", "vsd2"])
    d.signal(signal.SIGHUP)  # what ExecReload=/bin/kill -HUP $MAINPID does
    notify.wait_for("RELOADING=1", d)
    assert "STATUS=serving 2 port(s)" in notify.wait_for("READY=1", d)
    assert_features(str(rundir / "vsd2.sock"))

    conf.write_text("this is [not toml\n")  # a bad file: logged, ports unchanged, READY again
    d.signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1", d)
    assert "STATUS=serving 2 port(s)" in notify.wait_for("READY=1", d)
    assert d.proc.poll() is None

    d.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", d)
    assert d.wait() == 0, d.log()
    ready = [i for i, (_, m) in enumerate(notify.seen) if "READY=1" in m]
    reloading = [i for i, (_, m) in enumerate(notify.seen) if "RELOADING=1" in m]
    assert len(ready) == 3 and len(reloading) == 2 and ready[0] < reloading[0] < ready[1] < reloading[1] < ready[2]


def test_notify_abstract_socket(rundir, netns, daemons):
    notify = NotifySocket()  # NOTIFY_SOCKET=@name
    d = start(daemons, rundir, ["--socket", str(rundir / "vm1.sock"), "--tap", "vsd0", "--netns", netns,
                                "--control", ""], notify)
    assert any(l.startswith("STATUS=") for l in notify.wait_for("READY=1", d))
    d.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", d)
    assert d.wait() == 0, d.log()


# --- vhost-user backend conventions ---------------------------------------------------

def test_print_capabilities():
    r = subprocess.run([*vhostd_argv(), "--print-capabilities"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["type"] == "net"


def test_fd_serves_an_inherited_listening_socket(rundir, netns, daemons):
    path = str(rundir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what a .socket unit or libvirt passes
    listener.bind(path)
    listener.listen(4)
    fd = listener.fileno()
    notify = NotifySocket(rundir / "notify")
    d = start(daemons, rundir, ["--fd", str(fd), "--tap", "vsd0", "--netns", netns, "--control", ""], notify,
              pass_fds=(fd,))
    listener.close()  # only the daemon holds it now
    notify.wait_for("READY=1", d)
    assert_features(path)
    assert_features(path)  # and again after the first frontend left
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    assert os.path.exists(path), "the socket's path belongs to whoever bound it, not to vhostd"


# As systemd execs a socket-activated service: the passed sockets from fd 3 on,
# LISTEN_PID set to the pid that execs the daemon (exec keeps the pid).
ACTIVATE = ("import fcntl, os, sys; fds = [int(x) for x in sys.argv[1].split(',')]; "
            "fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]; "  # out of the way of 3, 4, ...
            "[os.dup2(fd, 3 + i) for i, fd in enumerate(fds)]; "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds))); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def activation_argv(fds) -> list[str]:
    return [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), "-m", "vhostd"]


def test_socket_activation_serves_the_socket_systemd_passed(rundir, netns, daemons):
    """LISTEN_FDS=1 with the port's socket at fd 3 (vhostd@.socket's ListenStream=
    with the path of --socket): a frontend that connected before the daemon
    started is served, then the next one; the path stays at stop (it is systemd's)."""
    path = str(rundir / "vsa0.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(path)  # QEMU, before vhostd runs: waits in the backlog
    notify = NotifySocket(rundir / "notify")
    d = start(daemons, rundir, ["--socket", path, "--tap", "vsa0", "--netns", netns, "--control",
                                str(rundir / "c.ctl")], notify, argv=activation_argv([listener.fileno()]),
              pass_fds=(listener.fileno(),), env={"LISTEN_FDNAMES": "vhostd@vsa0.socket"})
    listener.close()
    notify.wait_for("READY=1", d)
    early.close()
    assert_features(path)
    assert "(socket from systemd)" in d.log() and "no port uses" not in d.log(), d.log()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    assert os.path.exists(path), "the activated socket's path belongs to systemd"
    assert d.log().count("frontend connected") == 2, d.log()


def test_socket_activation_by_name_and_the_control_socket(rundir, netns, daemons):
    """Two sockets: the port's, named like the port (FileDescriptorName=vsb0) at an
    unrelated path, and the control socket (named control); a reload that reopens
    the port serves the same socket again."""
    port_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    port_sock.bind(str(rundir / "elsewhere.sock"))
    port_sock.listen(8)
    ctl_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl_sock.bind(str(rundir / "ctl.sock"))
    ctl_sock.listen(8)
    cfg = rundir / "vhostd.toml"
    cfg.write_text(f'control = "{rundir}/ctl.sock"\n[[port]]\nname = "vsb0"\nsocket = "{rundir}/vsb0.sock"\n'
                   f'tap = "vsb0"\nnetns = "{netns}"\n')
    notify = NotifySocket(rundir / "notify")
    fds = (port_sock.fileno(), ctl_sock.fileno())
    d = start(daemons, rundir, ["--config", str(cfg)], notify, argv=activation_argv(fds), pass_fds=fds,
              env={"LISTEN_FDNAMES": "vsb0:control"})
    port_sock.close()
    ctl_sock.close()
    notify.wait_for("READY=1", d)
    assert not os.path.exists(rundir / "vsb0.sock")  # served from the passed socket, nothing bound
    assert_features(str(rundir / "elsewhere.sock"))
    ctl = [sys.executable, "-m", "vhostd.ctl", "--control", str(rundir / "ctl.sock")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cfg.write_text(cfg.read_text() + "mtu = 1400\n")  # a change: the port is reopened
    r = subprocess.run([*ctl, "reload"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "1 opened, 1 closed" in r.stdout, (r.stdout, r.stderr, d.log())
    assert_features(str(rundir / "elsewhere.sock"))
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    assert os.path.exists(rundir / "ctl.sock") and os.path.exists(rundir / "elsewhere.sock")


def test_socket_activation_for_another_pid_is_ignored(rundir, netns, daemons):
    notify = NotifySocket(rundir / "notify")
    path = str(rundir / "vsc0.sock")
    d = start(daemons, rundir, ["--socket", path, "--tap", "vsc0", "--netns", netns, "--control", ""], notify,
              env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    notify.wait_for("READY=1", d)
    assert_features(path)  # bound by the daemon itself
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()


@pytest.mark.parametrize("kind", ["bound, not listening", "pipe", "datagram socket", "closed fd"])
def test_fd_that_is_not_a_listening_socket_exits_1_with_one_line(rundir, netns, kind):
    keep: list[int] = []  # fds to pass (and close afterwards)
    if kind == "bound, not listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(rundir / "idle.sock"))
        keep = [s.detach()]
    elif kind == "pipe":
        keep = list(os.pipe())
    elif kind == "datagram socket":
        keep = [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()]
    fd = keep[0] if keep else 99
    try:
        r = subprocess.run([*vhostd_argv(), "--fd", str(fd), "--tap", "vsd0", "--netns", netns, "--control", ""],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           pass_fds=keep[:1], timeout=30)
    finally:
        for k in keep:
            os.close(k)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    print(kind, "->", lines)
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"vhostd: error: --fd {fd}"), r.stderr


# --- the units' sandbox, emulated --------------------------------------------------------

# Applied in the sandboxed process right before it execs vhostd, as systemd does
# between fork and exec: umask, then the seccomp filters (NoNewPrivileges is set
# by setpriv). Mirrors systemd 252's src/shared/seccomp-util.c for the settings
# the units use, and checks that each filter bites before trusting it.
SANDBOX_EXEC = r'''
import ctypes, errno, json, mmap, os, socket, sys

spec = json.load(open(sys.argv[1]))
argv = sys.argv[sys.argv.index("--") + 1:]
os.umask(spec["umask"])

lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.POINTER(Cmp)]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW = 0x7FFF0000
NE, EQ, GT, MASKED_EQ = 1, 4, 6, 7
def ERRNO(e): return 0x00050000 | e
def nr(name): return lib.seccomp_syscall_resolve_name(name.encode())
def rule(ctx, action, name, *cmps):
    n = nr(name)
    if n < 0:
        return
    arr = (Cmp * max(len(cmps), 1))(*[Cmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, n, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add {name} {cmps}")

NS = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
      "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
ns_all = sum(NS.values())
ns_allowed = sum(NS[n] for n in spec["namespaces"]) if spec["namespaces"] is not None else ns_all

# MemoryDenyWriteExecute=: a filter of its own, like systemd's; loaded first,
# since the allow list below has no seccomp(2).
if spec["mdwe"]:
    ctx = lib.seccomp_init(ALLOW)
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
    rule(ctx, ERRNO(errno.EPERM), "mmap", (2, MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
    for name in ("mprotect", "pkey_mprotect"):
        rule(ctx, ERRNO(errno.EPERM), name, (2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
    rule(ctx, ERRNO(errno.EPERM), "shmat", (2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        raise SystemExit("sandbox: W+X mmap was not refused")
    except PermissionError:
        pass

# SystemCallFilter= allow list, SystemCallErrorNumber= for the rest,
# RestrictAddressFamilies= on socket(2), RestrictNamespaces= on setns/unshare/clone.
ctx = lib.seccomp_init(ERRNO(spec["errno"]))
special = {"socket", "setns", "unshare", "clone", "clone3"}
for name in spec["syscalls"]:
    if name not in special:
        rule(ctx, ALLOW, name)
if "socket" in spec["syscalls"]:
    fams = spec["families"]
    for f in range(0, 64):
        rule(ctx, ALLOW if f in fams else ERRNO(errno.EAFNOSUPPORT), "socket", (0, EQ, f, 0))
    rule(ctx, ERRNO(errno.EAFNOSUPPORT), "socket", (0, GT, 63, 0))
if "setns" in spec["syscalls"]:
    for n, flag in NS.items():
        if flag & ns_allowed:
            rule(ctx, ALLOW, "setns", (1, EQ, flag, 0))
    if ns_allowed == ns_all:
        rule(ctx, ALLOW, "setns", (1, EQ, 0, 0))
if "unshare" in spec["syscalls"]:
    rule(ctx, ALLOW, "unshare", (0, MASKED_EQ, ns_all & ~ns_allowed, 0))
if "clone" in spec["syscalls"]:
    rule(ctx, ALLOW, "clone", (0, MASKED_EQ, ns_all & ~ns_allowed, 0))
if "clone3" in spec["syscalls"]:
    # clone3 passes its flags in memory: with namespaces restricted systemd makes
    # it fail with ENOSYS so that libc falls back to clone(2), which it can check.
    rule(ctx, ALLOW if ns_allowed == ns_all else ERRNO(errno.ENOSYS), "clone3")
rc = lib.seccomp_load(ctx)
if rc < 0:
    raise OSError(-rc, "seccomp_load")

for fam in (socket.AF_INET, socket.AF_INET6, socket.AF_PACKET):
    if fam not in spec["families"]:
        try:
            socket.socket(fam, socket.SOCK_DGRAM if fam != socket.AF_PACKET else socket.SOCK_RAW).close()
            raise SystemExit(f"sandbox: socket family {fam} was not refused")
        except OSError as exc:
            assert exc.errno in (errno.EAFNOSUPPORT, errno.EPERM), exc
try:
    os.sched_setaffinity(0, os.sched_getaffinity(0))  # @resources
    if "sched_setaffinity" not in spec["syscalls"]:
        raise SystemExit("sandbox: the syscall filter was not applied")
except PermissionError:
    pass
os.execv(argv[0], argv)
'''


def syscall_groups(tool: str) -> dict[str, list[str]]:
    out = subprocess.run([tool, "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for n in names:
        out |= expand(groups[n], groups) if n.startswith("@") else {n}
    return out


def sandbox_spec(service: dict[str, list[str]], tool: str) -> dict:
    groups = syscall_groups(tool)
    # systemd applies the assignments in order: the first (no ~) makes an allow
    # list, a later ~ line removes from it, a later plain line adds back.
    values = service["SystemCallFilter"]
    assert not values[0].startswith("~"), "the emulation handles an allow-list SystemCallFilter (the units' form)"
    syscalls = expand(["@default"], groups)
    for value in values:
        names = expand(value.lstrip("~").split(), groups)
        syscalls = syscalls - names if value.startswith("~") else syscalls | names
    families = [getattr(socket, f) for f in service["RestrictAddressFamilies"][0].split()]
    ns = service.get("RestrictNamespaces", ["no"])[0]
    return {
        "umask": int(service["UMask"][0], 8),
        "syscalls": sorted(syscalls),
        "errno": getattr(errno, service["SystemCallErrorNumber"][0]),
        "families": families,
        "namespaces": None if ns == "no" else ([] if ns == "yes" else ns.split()),
        "mdwe": service.get("MemoryDenyWriteExecute") == ["yes"],
    }


def sandbox_uid(python: str, gid: int) -> int:
    """uid 65534 if it can run this interpreter with vhostd's dependencies (a Debian
    /usr/bin/python3 venv can; a pyenv under /root cannot), else root with the
    unit's capabilities only (what a root User= would get)."""
    # Two execs, as in the real run (setpriv -> sandbox_exec.py -> the daemon): the
    # first exec still holds root's capabilities from setpriv, the second does not,
    # so only the second shows whether the interpreter's path (e.g. a venv symlink
    # into /root) is reachable for the sandbox user.
    probe = ("import os, sys; os.execv(sys.executable, [sys.executable, '-c', "
             "'import cffi, uvloop, pyroute2, vhostd.native'])")
    r = subprocess.run(["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={gid}", "--clear-groups", python,
                        "-c", probe], capture_output=True, text=True,
                       cwd="/", env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode == 0:
        return SANDBOX_UID
    print(f"sandbox: uid {SANDBOX_UID} cannot run {python} with vhostd's dependencies "
          f"({(r.stderr.strip().splitlines() or ['?'])[-1]}): running as uid 0 with the unit's capabilities only")
    return 0


@pytest.mark.parametrize("unit", ["vhostd.service", "vhostd@.service"])
def test_daemon_serves_traffic_inside_the_units_sandbox(unit, rundir, netns, daemons):
    """The units' User/Group/UMask, capabilities, syscall filter, address families,
    namespaces and W^X rule leave a working daemon: READY, a 0660 socket of group
    kvm, frames from a guest reach the TAP, a clean stop."""
    need_root()
    tool = need_tool("systemd-analyze")
    need_tool("setpriv")
    need_tool("nsenter")
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 is missing")
    service = parse_unit(UNITS / unit)["Service"]
    try:
        gid = grp.getgrnam(service["Group"][0]).gr_gid
    except KeyError:
        pytest.skip(f"group {service['Group'][0]} does not exist here")
    spec = sandbox_spec(service, tool)
    uid = sandbox_uid(sys.executable, gid)

    # rundir plays /run/vhostd: RuntimeDirectory=, owned by User:Group, RuntimeDirectoryMode=.
    os.chown(rundir, uid, gid)
    rundir.chmod(int(service["RuntimeDirectoryMode"][0], 8))
    (rundir / "spec.json").write_text(json.dumps(spec))
    (rundir / "sandbox_exec.py").write_text(SANDBOX_EXEC)
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in service["CapabilityBoundingSet"][0].split())
    ambient = ",".join("+" + c.lower().removeprefix("cap_") for c in service["AmbientCapabilities"][0].split())
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", f"--bounding-set=-all,{caps}",
              f"--inh-caps=-all,{ambient}", f"--ambient-caps=-all,{ambient}", "--no-new-privs",
              sys.executable, str(rundir / "sandbox_exec.py"), str(rundir / "spec.json"), "--"]

    exec_start = service["ExecStart"][0].split()
    assert exec_start[0] == "/usr/local/bin/vhostd"
    if unit == "vhostd.service":
        # The example config, with its paths in rundir and its TAPs in our namespace
        # (this unit keeps CAP_SYS_ADMIN for setns).
        text = EXAMPLE.read_text().replace("/run/vhostd/", f"{rundir}/")
        # cpu_affinity: the workers' sched_setaffinity must pass the syscall filter
        text = re.sub(r'^(tap = "[^"]+")', rf'\1\nnetns = "{netns}"\ncpu_affinity = [0]', text, flags=re.M)
        (rundir / "vhostd.toml").write_text(text)
        args = [a.replace("/etc/vhostd/vhostd.toml", str(rundir / "vhostd.toml")).replace("/run/vhostd/", f"{rundir}/")
                for a in exec_start[1:]]
        tap, sock = "vm1", rundir / "vm1.sock"
    else:
        # The template has no CAP_SYS_ADMIN: its "host" namespace is our namespace.
        prefix = ["nsenter", f"--net=/run/netns/{netns}", *prefix]
        args = [a.replace("/run/vhostd/", f"{rundir}/").replace("%i", "vsdi0") for a in exec_start[1:]
                if a != "$VHOSTD_ARGS"]
        tap, sock = "vsdi0", rundir / "vsdi0.sock"

    # A path, 0777 like /run/systemd/notify (an abstract name would not reach the
    # template's daemon: abstract sockets belong to a network namespace).
    notify = NotifySocket(rundir / "notify")
    (rundir / "notify").chmod(0o777)
    d = start(daemons, rundir, args, notify, prefix=prefix)
    notify.wait_for("READY=1", d)
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid and st.st_uid == uid, \
        f"socket {sock}: mode {stat.S_IMODE(st.st_mode):o} uid {st.st_uid} gid {st.st_gid}"
    control = next(a for a in args if a.endswith(".ctl") or a.endswith("control.sock")) \
        if any(a.endswith(".ctl") for a in args) else rundir / "control.sock"
    cmode = stat.S_IMODE(os.stat(control).st_mode)
    assert cmode == 0o600, f"control socket {control}: mode {cmode:o} (the unit asks for 0600)"

    from tests.daemon.traffic import Guest, frame, marker_of

    g = Guest(str(sock)).setup()
    try:
        pkt = packet_socket(netns, tap)
        g.send([frame(i) for i in range(8)])
        got = set()
        while len(got) < 8:
            got.add(marker_of(recv_matching(pkt, lambda data: marker_of(data) is not None)))
        pkt.close()
    finally:
        g.close()
    d.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", d)
    assert d.wait() == 0, d.log()


# --- install-service.sh -----------------------------------------------------------------

def test_install_service_into_destdir(tmp_path):
    dest = tmp_path / "root"
    env = dict(os.environ, DESTDIR=str(dest), PYTHON=sys.executable,
               # the test interpreter's cffi/uvloop/pyroute2: no downloads of run-time deps
               VHOSTD_VENV_ARGS="--system-site-packages")
    before = {p for p in ("build", "vhostd.egg-info") if (ROOT / p).exists()}
    r = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr

    for rel in ("opt/vhostd/bin/python", "opt/vhostd/bin/vhostd", "opt/vhostd/bin/vhostctl",
                "usr/local/bin/vhostd", "usr/local/bin/vhostctl", "etc/vhostd/vhostd.toml",
                "etc/systemd/system/vhostd.service", "etc/systemd/system/vhostd@.service"):
        assert (dest / rel).exists(), f"{rel} missing"
    for name in ("vhostd.service", "vhostd@.service", "vhostd.socket", "vhostd@.socket"):
        assert (dest / "etc/systemd/system" / name).read_bytes() == (UNITS / name).read_bytes()
    assert (dest / "etc/vhostd/vhostd.toml").read_bytes() == EXAMPLE.read_bytes()
    for rel in ("usr/local/share/man/man8/vhostd.8", "usr/local/share/man/man1/vhostctl.1",
                "usr/local/share/bash-completion/completions/vhostd",
                "usr/local/share/bash-completion/completions/vhostctl"):
        assert (dest / rel).stat().st_size > 0, f"{rel} missing"
    # QEMU's vhost-user backend descriptor: a net backend, the installed binary
    desc = json.loads((dest / "etc/qemu/vhost-user/50-vhostd.json").read_text())
    assert desc["type"] == "net" and desc["binary"] == "/usr/local/bin/vhostd" and desc["description"]
    assert set(desc) <= {"description", "type", "binary", "features"}
    assert os.readlink(dest / "usr/local/bin/vhostd") == "../../../opt/vhostd/bin/vhostd"
    assert {p for p in ("build", "vhostd.egg-info") if (ROOT / p).exists()} == before, "built inside the repo"

    from vhostd import __version__

    v = subprocess.run([str(dest / "usr/local/bin/vhostd"), "--version"], capture_output=True, text=True,
                       cwd="/", timeout=30)
    assert v.returncode == 0 and v.stdout.strip() == f"vhostd {__version__}", v.stdout + v.stderr
    caps = subprocess.run([str(dest / "usr/local/bin/vhostd"), "--print-capabilities"], capture_output=True,
                          text=True, cwd="/", timeout=30)
    assert json.loads(caps.stdout) == {"type": "net"}
    native = subprocess.run([str(dest / "opt/vhostd/bin/python"), "-c", "import vhostd.native, vhostd; "
                             "print(vhostd.__file__)"], capture_output=True, text=True, cwd="/", timeout=30)
    assert native.returncode == 0 and native.stdout.startswith(str(dest / "opt/vhostd")), native

    # Idempotent: nothing rebuilt, an edited config kept.
    conf = dest / "etc/vhostd/vhostd.toml"
    conf.write_text(conf.read_text() + "# edited\n")
    r2 = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    print(r2.stdout, r2.stderr)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "up to date" in r2.stdout and "kept" in r2.stdout
    assert conf.read_text().endswith("# edited\n")
