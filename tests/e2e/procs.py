"""Host-side processes for the QEMU end-to-end tests: backends, servers, namespaces.

Standard library only. Pieces:

* ``BackgroundProcess``: a backend (vhostd, dpdk-testpmd) whose output is kept for
  failure messages; ``dpdk_reference_backend()`` builds the DPDK testpmd one.
* ``wait_for_socket()``: waits for a backend's listening vhost-user socket.
* ``NetNS``: a uniquely named network namespace (``vhd-<random>``) with helpers to
  run commands in it, wait for a TAP and configure it.
* ``HttpFileServer``: a random file (>= 20 MB) and its sha256, served over HTTP by
  ``python3 -m http.server`` bound to an address inside a namespace.
* ``ensure_apt_packages()``, ``tail()``: host tools, failure-message helper.

All traffic stays inside namespaces created here; addresses are in 198.18.0.0/24.
The QEMU side is in guest.py, the guest image in guest_image.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST_IP = "198.18.0.1"
GUEST_IP = "198.18.0.2"
PREFIX_LEN = 24
DEFAULT_FILE_SIZE = 20 * 1024 * 1024 + 12345  # >= 20 MB, not a round number


def tail(text: str, lines: int = 60) -> str:
    parts = text.splitlines()
    return "\n".join(parts[-lines:])


# --------------------------------------------------------------------------- #
# process helpers

_libc = None


def _set_pdeathsig() -> None:
    """preexec_fn: the child gets SIGKILL when the test process dies."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def ensure_apt_packages(binaries: dict[str, str]) -> list[str]:
    """Install missing tools with apt-get (root only). ``binaries`` maps a binary
    name to its Debian package. Returns the binaries still missing afterwards."""
    missing = {b: p for b, p in binaries.items() if shutil.which(b) is None}
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return list(missing)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    pkgs = sorted(set(missing.values()))
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs]
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [b for b in missing if shutil.which(b) is None]


def wait_for_socket(path: str | os.PathLike, timeout: float = 20.0,
                    proc: "BackgroundProcess | None" = None) -> None:
    """Wait until a listening unix socket file exists (without connecting to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if proc is not None and not proc.alive():
            raise AssertionError(f"backend exited (rc={proc.returncode}) before creating "
                                 f"{path}\n{proc.describe()}")
        time.sleep(0.05)
    msg = f"socket {path} did not appear within {timeout}s"
    if proc is not None:
        msg += "\n" + proc.describe()
    raise AssertionError(msg)


# --------------------------------------------------------------------------- #
# network namespaces


def _run(cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (rc={r.returncode}): "
                           f"{r.stderr.strip() or r.stdout.strip()}")
    return r


def netns_name(prefix: str = "vhd-") -> str:
    return prefix + secrets.token_hex(4)


class NetNS:
    """A network namespace of our own, named ``vhd-<random>``."""

    def __init__(self, name: str | None = None):
        self.name = name or netns_name()

    def create(self) -> "NetNS":
        _run(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])
        return self

    def exists(self) -> bool:
        return os.path.exists(f"/run/netns/{self.name}")

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, argv: list[str], check: bool = True, timeout: float = 30,
             **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace, capturing its output."""
        return _run(self.cmd(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        kw.setdefault("preexec_fn", _set_pdeathsig)
        return subprocess.Popen(self.cmd(argv), **kw)

    def pids(self) -> list[int]:
        r = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def link_exists(self, ifname: str) -> bool:
        return self.exec(["ip", "link", "show", "dev", ifname], check=False).returncode == 0

    def wait_link(self, ifname: str, timeout: float = 20.0,
                  proc: "BackgroundProcess | None" = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.link_exists(ifname):
                return
            if proc is not None and not proc.alive():
                raise AssertionError(f"backend exited (rc={proc.returncode}) before "
                                     f"creating {ifname}\n{proc.describe()}")
            time.sleep(0.1)
        msg = f"interface {ifname} did not appear in netns {self.name} within {timeout}s"
        if proc is not None:
            msg += "\n" + proc.describe()
        raise AssertionError(msg)

    def configure_tap(self, ifname: str, address: str = f"{HOST_IP}/{PREFIX_LEN}",
                      timeout: float = 20.0, mtu: int | None = None,
                      proc: "BackgroundProcess | None" = None) -> None:
        """Wait for ``ifname`` to appear in the namespace, give it ``address`` and
        bring it up."""
        self.wait_link(ifname, timeout, proc)
        if mtu:
            self.exec(["ip", "link", "set", "dev", ifname, "mtu", str(mtu)])
        self.exec(["ip", "addr", "replace", address, "dev", ifname])
        self.exec(["ip", "link", "set", "dev", ifname, "up"])

    def diagnostics(self, ifname: str | None = None) -> str:
        """Links (with counters), addresses and neighbours inside the namespace,
        for failure messages."""
        out = [f"--- netns {self.name} ---"]
        for argv in (["ip", "-s", "link", "show"] + (["dev", ifname] if ifname else []),
                     ["ip", "addr", "show"], ["ip", "neigh", "show"]):
            try:
                r = self.exec(argv, check=False, timeout=10)
                out.append(f"$ {shlex.join(argv)}\n{(r.stdout + r.stderr).rstrip()}")
            except Exception as e:  # diagnostics must never raise
                out.append(f"$ {shlex.join(argv)}: {e}")
        return "\n".join(out)

    def kill_all(self, grace: float = 3.0) -> None:
        """Kill every process still running inside the namespace."""
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if os.path.exists(f"/proc/{p}")
                        and _proc_state(p) != "Z"]
                time.sleep(0.05)
            if not pids:
                return

    def delete(self) -> None:
        if not self.exists():
            return
        self.kill_all()
        _run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> "NetNS":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


# --------------------------------------------------------------------------- #
# background processes (backends, servers)


class BackgroundProcess:
    """A long-running process (optionally inside a netns) whose stdout+stderr are
    kept in a file for failure messages. Runs in its own process group."""

    def __init__(self, argv: list[str], *, netns: NetNS | str | None = None,
                 name: str | None = None, env: dict | None = None,
                 cwd: str | os.PathLike | None = None, stdin_pipe: bool = False,
                 logdir: str | os.PathLike | None = None, merge_stderr: bool = True):
        if isinstance(netns, str):
            netns = NetNS(netns)
        self.argv = list(argv)
        self.netns = netns
        self.name = name or Path(argv[0]).name
        self.env = env
        self.cwd = cwd
        self.stdin_pipe = stdin_pipe
        self._own_logdir = logdir is None
        self.logdir = Path(logdir or tempfile.mkdtemp(prefix="vhd-proc-"))
        self.stdout_path = self.logdir / f"{self.name}.out"
        self.stderr_path = self.stdout_path if merge_stderr else self.logdir / f"{self.name}.err"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "BackgroundProcess":
        cmd = self.netns.cmd(self.argv) if self.netns else self.argv
        out = open(self.stdout_path, "wb")
        err = out if self.stderr_path == self.stdout_path else open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                stdout=out, stderr=err, env=self.env, cwd=self.cwd,
                start_new_session=True, preexec_fn=_set_pdeathsig)
        finally:
            out.close()
            if err is not out:
                err.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self, lines: int = 40) -> str:
        state = "running" if self.alive() else f"exited rc={self.returncode}"
        s = f"--- {self.name} ({state}) output, last {lines} lines ---\n{tail(self.output(), lines)}"
        if self.stderr_path != self.stdout_path:
            s += f"\n--- {self.name} stderr ---\n{tail(self.stderr(), lines)}"
        return s

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (to the process itself), wait; SIGKILL the group after
        ``timeout``. Returns the exit status (negative: killed by a signal)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # leftovers of the group (e.g. children)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        """Kill what is left and remove the log directory when it is ours."""
        self.kill()
        if self._own_logdir:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def __enter__(self) -> "BackgroundProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def dpdk_reference_backend(netns: NetNS, socket_path: str, tap: str, *,
                           queues: int = 1, lcores: str | None = None,
                           logdir: str | os.PathLike | None = None) -> BackgroundProcess:
    """DPDK's testpmd as a vhost-user backend forwarding to a TAP in ``netns``.
    Its stdin is a pipe kept open (testpmd exits at EOF)."""
    argv = ["dpdk-testpmd"]
    argv += ["--lcores", lcores] if lcores else ["-l", "0-1"]
    argv += ["--no-huge", "-m", "1024", "--no-pci", f"--file-prefix=ref-{netns.name}",
             "--vdev", f"net_vhost0,iface={socket_path},queues={queues}",
             "--vdev", f"net_tap0,iface={tap}",
             "--", "--forward-mode=io", "--auto-start", "--total-num-mbufs=8192"]
    if queues > 1:
        argv += [f"--rxq={queues}", f"--txq={queues}"]
    return BackgroundProcess(argv, netns=netns, name="dpdk-testpmd", stdin_pipe=True,
                             logdir=logdir)


# --------------------------------------------------------------------------- #
# HTTP file server inside a namespace


class HttpFileServer:
    """Serves a random file over HTTP inside ``netns`` (python3 -m http.server
    bound to ``address``). The address must already exist in the namespace."""

    def __init__(self, netns: NetNS | str, address: str = HOST_IP, port: int = 8080,
                 size: int = DEFAULT_FILE_SIZE, filename: str = "payload.bin",
                 directory: str | os.PathLike | None = None):
        self.netns = NetNS(netns) if isinstance(netns, str) else netns
        self.address = address
        self.port = port
        self.size = size
        self.filename = filename
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="vhd-http-"))
        self.path = self.directory / filename
        self.sha256 = ""
        self.proc: BackgroundProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/{self.filename}"

    def generate(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "wb") as f:
            left = self.size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        self.sha256 = h.hexdigest()
        return self.sha256

    def start(self, timeout: float = 15.0) -> "HttpFileServer":
        if not self.sha256:
            self.generate()
        argv = [sys.executable, "-u", "-m", "http.server", str(self.port),
                "--bind", self.address, "--directory", str(self.directory)]
        self.proc = BackgroundProcess(argv, netns=self.netns, name="http-server",
                                      logdir=self.directory)
        self.proc.start()
        probe = ("import socket,sys\n"
                 "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1)\n"
                 "s.close()\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError("http server exited\n" + self.proc.describe())
            if "Serving HTTP" in self.proc.output():
                return self
            r = self.netns.exec([sys.executable, "-c", probe, self.address, str(self.port)],
                                check=False)
            if r.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("http server did not start\n" + self.proc.describe())

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(signal.SIGTERM, timeout=3)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "HttpFileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
