"""Access to the daemon's sockets and running without privileges.

- The vhost-user and control sockets get the owner, group and mode asked for
  (--socket-owner/--socket-group/--socket-mode, --control-mode, TOML keys),
  0660 by default whatever the umask; unknown users/groups and bad modes are
  refused with one clear line.
- vhostd as an unprivileged uid with no capability at all serves a persistent
  TAP pre-created for that uid (`ip tuntap add ... user U`): frames pass both ways.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, DaemonProcess, need_root, packet_socket
from tests.driver.frontend import Nack
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of

NOBODY = 65534


def _stat(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostd", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)


def test_sockets_default_to_0660_whatever_the_umask(tmp_path, netns):
    old = os.umask(0o000)  # inherited by the daemon: a umask must not widen the sockets
    try:
        d = DaemonProcess(tmp_path, netns, "vac0").wait_ready()
    finally:
        os.umask(old)
    try:
        assert _stat(d.socket) == (os.getuid(), os.getgid(), 0o660)
        assert _stat(d.control) == (os.getuid(), os.getgid(), 0o660)
    finally:
        assert d.stop() == 0


def test_socket_owner_group_mode_from_the_command_line(tmp_path, netns):
    d = DaemonProcess(tmp_path, netns, "vac1", "--socket-owner", "nobody", "--socket-group", str(NOBODY),
                      "--socket-mode", "0640").wait_ready()
    try:
        assert _stat(d.socket) == (NOBODY, NOBODY, 0o640)
        assert _stat(d.control) == (NOBODY, NOBODY, 0o640)
    finally:
        assert d.stop() == 0
    d = DaemonProcess(tmp_path, netns, "vac2", "--socket-group", "nogroup", "--control-mode", "600").wait_ready()
    try:
        assert _stat(d.socket) == (os.getuid(), NOBODY, 0o660)
        assert _stat(d.control) == (os.getuid(), NOBODY, 0o600)
    finally:
        assert d.stop() == 0


def test_socket_access_from_the_config_file_per_port_and_for_add_port(tmp_path, netns):
    conf = tmp_path / "vhostd.toml"
    ctl = tmp_path / "ctl.sock"
    conf.write_text(
        f'control = "{ctl}"\nsocket_group = "nogroup"\nsocket_mode = 0o640\n'
        f'[[port]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\ntap = "vaca"\nnetns = "{netns}"\n'
        f'[[port]]\nname = "b"\nsocket = "{tmp_path}/b.sock"\ntap = "vacb"\nnetns = "{netns}"\n'
        f'socket_owner = "nobody"\nsocket_mode = "0600"\n')
    d = DaemonProcess.from_config(tmp_path, conf, ctl)
    try:
        d.wait_ready()
        assert _stat(ctl) == (os.getuid(), NOBODY, 0o640)
        assert _stat(tmp_path / "a.sock") == (os.getuid(), NOBODY, 0o640)
        assert _stat(tmp_path / "b.sock") == (NOBODY, NOBODY, 0o600)
        from tests.daemon.traffic import vhostctl

        r = vhostctl(d, "add-port", "--socket", str(tmp_path / "c.sock"), "--tap", "vacc", "--netns", netns)
        assert r.returncode == 0, r.stdout + r.stderr
        assert _stat(tmp_path / "c.sock") == (os.getuid(), NOBODY, 0o640)  # the file's defaults
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("args, message", [
    (("--socket-owner", "no-such-user-vhd"), "--socket-owner: unknown user 'no-such-user-vhd'"),
    (("--socket-group", "no-such-group-vhd"), "--socket-group: unknown group 'no-such-group-vhd'"),
    (("--socket-mode", "0999"), "--socket-mode '0999' is not an octal permission mode"),
    (("--socket-mode", "rw-rw----"), "--socket-mode 'rw-rw----' is not an octal permission mode"),
    (("--socket-mode", "4755"), "--socket-mode 0o4755 is not a permission mode"),
    (("--control-mode", "8"), "--control-mode '8' is not an octal permission mode"),
])
def test_bad_socket_access_flags_fail_clearly(tmp_path, args, message):
    r = _run("--socket", str(tmp_path / "s"), "--tap", "vacx", "--control", "", *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"vhostd: error: {message}"), r.stderr


@pytest.mark.parametrize("line, message", [
    ('socket_owner = "no-such-user-vhd"', "socket_owner: unknown user 'no-such-user-vhd'"),
    ('socket_group = "no-such-group-vhd"', "socket_group: unknown group 'no-such-group-vhd'"),
    ('socket_mode = "u+rw"', "socket_mode 'u+rw' is not an octal permission mode"),
    ("socket_mode = 0o7777", "socket_mode 0o7777 is not a permission mode"),
])
def test_bad_socket_access_keys_fail_clearly(tmp_path, line, message):
    conf = tmp_path / "vhostd.toml"
    for text in (f'{line}\n[[port]]\nsocket = "{tmp_path}/a.sock"\ntap = "vacy"\n',
                 f'[[port]]\nsocket = "{tmp_path}/a.sock"\ntap = "vacy"\n{line}\n'):
        conf.write_text(text)
        r = _run("--config", str(conf), "--control", "")
        assert r.returncode == 1 and message in r.stderr, r.stderr


def test_chown_without_permission_fails_clearly(tmp_path):
    """A daemon that may not chown (no CAP_CHOWN) says so instead of leaving a socket
    with the wrong owner."""
    need_root()
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is missing")
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o777)
    r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-chown", sys.executable, "-m", "vhostd",
                        "--socket", str(d / "s"), "--tap", "vacz", "--control", str(d / "c"),
                        "--socket-owner", "nobody"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       timeout=30)
    assert r.returncode == 1, r.stderr
    assert "not permitted (another owner needs CAP_CHOWN" in r.stderr, r.stderr
    assert not (d / "s").exists() and not (d / "c").exists()


# --- no capability at all ---------------------------------------------------------------

def _unprivileged_python(tmp: Path) -> tuple[list[str], dict]:
    """An interpreter uid NOBODY can run with vhostd importable. The test venv's may sit
    under /root (unreachable): then Debian's /usr/bin/python3 with its _cffi_backend
    (python3-cffi-backend; the compiled extension needs only that at run time), the
    worktree on PYTHONPATH and world-readable copies of the venv's pure-Python pyroute2
    and prometheus_client."""
    probe = "import vhostd.native, vhostd.daemon, pyroute2, prometheus_client"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", VHOSTD_EVENT_LOOP="asyncio")
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    for python in (sys.executable, "/usr/bin/python3"):
        if python != sys.executable:
            import prometheus_client
            import pyroute2

            lib = tmp / "pylib"
            if not lib.exists():
                for mod in (pyroute2, prometheus_client):
                    shutil.copytree(Path(mod.__file__).parent, lib / mod.__name__)
            subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True)
            env["PYTHONPATH"] = f"{ROOT}:{lib}"
        r = subprocess.run([*drop, python, "-c", f"import os, sys; os.execv(sys.executable, "
                            f"[sys.executable, '-c', {probe!r}])"], capture_output=True, text=True, cwd="/", env=env)
        if r.returncode == 0:
            return [python], env
        last = r.stderr.strip().splitlines()[-1:] or ["?"]
    pytest.fail(f"no interpreter uid {NOBODY} can run vhostd with (last error: {last[0]}); "
                "install python3-cffi-backend")


def test_unprivileged_uid_without_capabilities_serves_a_precreated_tap(netns):
    need_root()
    tmp = Path(tempfile.mkdtemp(prefix="vhd-nocap-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    proc = None
    try:
        python, env = _unprivileged_python(tmp)
        run = tmp / "run"
        run.mkdir()
        os.chown(run, NOBODY, NOBODY)
        # what an administrator does once, as root
        subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", "vnc0", "mode", "tap", "multi_queue",
                        "vnet_hdr", "user", str(NOBODY)], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "dev", "vnc0", "up"], check=True)
        sock, ctl = run / "vm.sock", run / "ctl.sock"
        log = open(tmp / "daemon.log", "wb")
        # no --netns (setns needs CAP_SYS_ADMIN): the daemon runs inside the namespace
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs",
             *python, "-m", "vhostd", "--socket", str(sock), "--tap", "vnc0", "--control", str(ctl), "-v"],
            stdout=log, stderr=subprocess.STDOUT, cwd="/", env=env)
        deadline = time.monotonic() + 20
        while not ctl.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "daemon.log").read_text()
            time.sleep(0.05)
        # find the daemon (setpriv execs it in place of itself, after `ip netns exec`)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split()[0] == str(NOBODY), fields["Uid"]
        for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            assert int(fields[cap].strip(), 16) == 0, f"{cap} {fields[cap]}"
        assert _stat(sock) == (NOBODY, NOBODY, 0o660)

        g = Guest(str(sock)).setup()
        try:
            pkt = packet_socket(netns, "vnc0")
            frames = [frame(i, 300) for i in range(16)]
            g.send(frames)
            assert collect(pkt, len(frames)) == dict(enumerate(frames))
            g.post_rx(8)
            rx = [frame(i, 400, b"RXF") for i in range(4)]
            for f in rx:
                pkt.send(f)
            got = {marker_of(u.data[HDR:], b"RXF"): u.data[HDR:] for u in g.rx.wait_used(len(rx))}
            assert got == dict(enumerate(rx))
            pkt.close()
        finally:
            g.close()
        # QEMU's host_mtu asks for another MTU (NET_SET_MTU): without CAP_NET_ADMIN the
        # request is refused (REPLY_ACK failure) with one line; the port serves the next frontend
        g = Guest(str(sock))
        try:
            try:
                g.setup(mtu=1400)
                raise AssertionError("NET_SET_MTU 1400 succeeded without CAP_NET_ADMIN")
            except Nack:
                pass
        finally:
            g.close()
        g = Guest(str(sock)).setup()
        try:
            pkt = packet_socket(netns, "vnc0")
            g.send([frame(100, 300)])
            assert collect(pkt, 1) == {100: frame(100, 300)}
            pkt.close()
        finally:
            g.close()
        proc.terminate()
        assert proc.wait(10) == 0, (tmp / "daemon.log").read_text()
        text = (tmp / "daemon.log").read_text()
        assert "NET_SET_MTU: TAP vnc0 needs mtu 1400 and vhostd lacks CAP_NET_ADMIN" in text, text
        assert "(existing, attached)" in text, text
        r = subprocess.run(["ip", "-n", netns, "link", "show", "dev", "vnc0"], capture_output=True)
        assert r.returncode == 0, "the pre-created TAP must stay"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
