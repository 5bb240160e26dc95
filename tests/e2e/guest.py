"""End-to-end harness for vhostd: a QEMU guest with a vhost-user virtio-net card.

Standard library only. Pieces:

* ``build_guest()``: builds (or finds cached) ``vmlinuz`` + ``initramfs.cpio.gz``
  with ``scripts/build-guest.sh``.
* ``make_initramfs()``: the base initramfs plus an appended gzip'd newc cpio
  carrying ``/test.sh`` (the kernel unpacks concatenated archives in order).
* ``Qemu`` / ``run_guest()``: boots the guest against a vhost-user socket, waits
  for ``VHOSTD-TEST-EXIT=<rc>`` on the serial console, always kills QEMU.
* ``NetNS``: a uniquely named network namespace (``vhd-<random>``) with helpers to
  run commands in it, wait for a TAP and configure it.
* ``HttpFileServer``: a random file (>= 20 MB) and its sha256, served over HTTP by
  ``python3 -m http.server`` bound to an address inside a namespace.
* ``BackgroundProcess``: a backend (vhostd, dpdk-testpmd) whose output is kept for
  failure messages.
* ``net_test_script()``: the guest-side ping + download + sha256 check.

All traffic stays inside namespaces created here; addresses are in 198.18.0.0/24.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import io
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"
EXIT_MARKER = "VHOSTD-TEST-EXIT="
_EXIT_RE = re.compile(r"VHOSTD-TEST-EXIT=(\d+)")

HOST_IP = "198.18.0.1"
GUEST_IP = "198.18.0.2"
PREFIX_LEN = 24
DEFAULT_FILE_SIZE = 20 * 1024 * 1024 + 12345  # >= 20 MB, not a round number
QEMU_BIN = os.environ.get("VHOSTD_QEMU", "qemu-system-x86_64")


def default_accel() -> str:
    """Accelerator for QEMU: env VHOSTD_ACCEL, default tcg (/dev/kvm hangs here)."""
    return os.environ.get("VHOSTD_ACCEL", "tcg") or "tcg"


def default_guest_dir() -> Path:
    return Path(os.environ.get("VHOSTD_GUEST_DIR") or "/var/cache/vhostd/guest")


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


# --------------------------------------------------------------------------- #
# guest image


@dataclass
class GuestImage:
    directory: Path
    vmlinuz: Path
    initramfs: Path
    stamp: str = ""


def build_guest(outdir: str | os.PathLike | None = None, timeout: float = 1200) -> GuestImage:
    """Build or locate the guest kernel + base initramfs (cached by the script)."""
    out = Path(outdir) if outdir else default_guest_dir()
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed (rc={r.returncode}):\n"
                           f"{tail(r.stdout, 20)}\n{tail(r.stderr, 40)}")
    img = GuestImage(out, out / "vmlinuz", out / "initramfs.cpio.gz")
    if not img.vmlinuz.is_file() or not img.initramfs.is_file():
        raise RuntimeError(f"{BUILD_SCRIPT} did not produce the guest in {out}")
    with contextlib.suppress(OSError):
        img.stamp = (out / "guest.stamp").read_text().splitlines()[0]
    return img


# --------------------------------------------------------------------------- #
# initramfs overlay (newc cpio writer)


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0,
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    nameb = name.encode() + b"\0"
    fields = [
        ino, mode, 0, 0, 1, int(time.time()), len(data),  # ino mode uid gid nlink mtime size
        0, 0, rdev[0], rdev[1],                             # devmajor devminor rdevmajor rdevminor
        len(nameb), 0,                                      # namesize check
    ]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = hdr + nameb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(files: dict[str, str | bytes], mode: int = 0o755) -> bytes:
    """An uncompressed newc cpio archive with ``files`` (path -> content).
    Parent directories are added; ``mode`` applies to all regular files."""
    buf = io.BytesIO()
    ino = 0x5600
    dirs: set[str] = set()
    for path in sorted(files):
        rel = path.lstrip("/")
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                ino += 1
                buf.write(_newc_entry(d, stat.S_IFDIR | 0o755, ino=ino))
        data = files[path]
        if isinstance(data, str):
            data = data.encode()
        ino += 1
        buf.write(_newc_entry(rel, stat.S_IFREG | mode, data, ino=ino))
    buf.write(_newc_entry("TRAILER!!!", 0))
    out = buf.getvalue()
    return out + b"\0" * (-len(out) % 512)


def make_initramfs(base: str | os.PathLike, out: str | os.PathLike,
                   test_script: str | None = None,
                   extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``out`` = base initramfs + a gzip'd newc archive carrying /test.sh."""
    files: dict[str, str | bytes] = dict(extra_files or {})
    if test_script is not None:
        if not test_script.startswith("#!"):
            test_script = "#!/bin/sh\n" + test_script
        files["test.sh"] = test_script
    data = Path(base).read_bytes()
    data += b"\0" * (-len(data) % 4)
    if files:
        data += gzip.compress(newc_archive(files), compresslevel=1)
    out = Path(out)
    out.write_bytes(data)
    return out


# --------------------------------------------------------------------------- #
# QEMU


@dataclass
class GuestResult:
    rc: int | None            # the /test.sh exit code, None when no marker was seen
    log: str                  # full console log
    elapsed: float            # seconds from QEMU start until it stopped
    qemu_rc: int | None       # QEMU's own exit status
    timed_out: bool = False
    qemu_stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def describe(self, lines: int = 60) -> str:
        why = ("timed out" if self.timed_out else
               "no VHOSTD-TEST-EXIT marker" if self.rc is None else f"test rc={self.rc}")
        s = (f"guest failed: {why}, qemu rc={self.qemu_rc}, {self.elapsed:.1f}s\n"
             f"--- console (last {lines} lines) ---\n{tail(self.log, lines)}")
        if self.qemu_stderr.strip():
            s += f"\n--- qemu stderr ---\n{tail(self.qemu_stderr, 20)}"
        if self.extra.get("at_timeout"):
            s += f"\n--- at the timeout, before QEMU was stopped ---\n{self.extra['at_timeout']}"
        return s

    def value(self, key: str) -> str | None:
        """The last ``KEY=value`` printed on the console."""
        found = re.findall(rf"^{re.escape(key)}=(\S*)", self.log, re.M)
        return found[-1] if found else None

    def assert_ok(self, context: str = "") -> None:
        if not self.ok:
            msg = self.describe()
            if context:
                msg += "\n" + context
            raise AssertionError(msg)


class Qemu:
    """One QEMU guest wired to a vhost-user socket.

    server=False: QEMU is the vhost-user client (the backend listens on ``socket``).
    server=True:  QEMU listens (``server=on,wait=off``), the backend connects.
    reconnect=N:  client mode only, QEMU reconnects N seconds after a disconnect.
    """

    def __init__(self, image: GuestImage, socket_path: str | os.PathLike, *,
                 test_script: str | None = None,
                 extra_files: dict[str, str | bytes] | None = None,
                 ip: str | None = f"{GUEST_IP}/{PREFIX_LEN}",
                 cmdline: str = "",
                 mac: str | None = "52:54:00:12:34:56",
                 smp: int = 1,
                 mem_mb: int = 256,
                 accel: str | None = None,
                 queues: int = 1,
                 device_opts: list[str] | tuple[str, ...] | str = (),
                 netdev_opts: list[str] | tuple[str, ...] | str = (),
                 server: bool = False,
                 reconnect: int | None = None,
                 serial: str = "stdio",
                 extra_args: list[str] | tuple[str, ...] = (),
                 workdir: str | os.PathLike | None = None,
                 cpu_affinity: set[int] | None = None,
                 echo: bool | None = None):
        self.image = image
        self.socket_path = str(socket_path)
        self.test_script = test_script
        self.extra_files = extra_files
        self.ip = ip
        self.cmdline = cmdline
        self.mac = mac
        self.smp = smp
        self.mem_mb = mem_mb
        self.accel = accel or default_accel()
        self.queues = queues
        self.device_opts = [device_opts] if isinstance(device_opts, str) else list(device_opts)
        self.netdev_opts = [netdev_opts] if isinstance(netdev_opts, str) else list(netdev_opts)
        self.server = server
        self.reconnect = reconnect
        if serial not in ("stdio", "file"):
            raise ValueError("serial must be 'stdio' or 'file'")
        self.serial = serial
        self.extra_args = list(extra_args)
        self.cpu_affinity = cpu_affinity
        self.echo = bool(os.environ.get("VHOSTD_E2E_ECHO")) if echo is None else echo
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vhd-qemu-"))
        self.proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stderr_file = None
        self._serial_file = self.workdir / "console.log"
        # Called by wait() on a timeout while QEMU still runs (the backend still has
        # the rings); what it returns goes into the result's description.
        self.on_timeout: Callable[[], str] | None = None
        self._t0 = 0.0
        self.result: GuestResult | None = None

    # -- command line ---------------------------------------------------------
    def kernel_cmdline(self) -> str:
        parts = ["console=ttyS0", "quiet", "panic=-1", "loglevel=4",
                 "tsc=reliable", "no_timer_check", "mitigations=off"]
        if self.ip:
            parts.append(f"vhostd.ip={self.ip}")
        if self.cmdline:
            parts.append(self.cmdline)
        return " ".join(parts)

    def smp_arg(self, accel: str) -> str:
        """One vCPU under TCG is given a second, absent CPU slot (maxcpus=2).
        QEMU 7.2 (Debian 12's) compiles guest code for a machine with maxcpus 1
        without memory barriers (no CF_PARALLEL: tcg_gen_mb emits nothing, and
        locked instructions are not atomic on the host), so the guest's
        virtio_mb() orders nothing against another process. The host CPU can then
        let the guest's load of avail_event pass its store of avail->idx (or its
        load of used->idx pass its store of used_event), and now and then a kick
        or an interrupt is lost with any vhost-user backend: a queue stalls for
        good. This is what stopped test_bulk_tcp about once in 30 runs. With
        maxcpus > 1 QEMU emits the barriers; newer QEMU always does."""
        if self.smp == 1 and accel == "tcg":
            return "1,maxcpus=2"
        return str(self.smp)

    def command(self, initrd: Path) -> list[str]:
        accel = self.accel
        chardev = f"socket,id=c0,path={self.socket_path}"
        if self.server:
            chardev += ",server=on,wait=off"
        elif self.reconnect is not None:
            chardev += f",reconnect={int(self.reconnect)}"
        netdev = "vhost-user,id=n0,chardev=c0"
        if self.queues > 1:
            netdev += f",queues={self.queues}"
        for o in self.netdev_opts:
            netdev += "," + o
        # vectors=0: QEMU 7.2 under TCG crashes in vhost_net_start with MSI-X.
        device = "virtio-net-pci,netdev=n0,vectors=0"
        if self.mac:
            device += f",mac={self.mac}"
        if self.queues > 1 and not any(o.startswith("mq=") for o in self.device_opts):
            device += ",mq=on"
        if not any(o.startswith("romfile=") for o in self.device_opts):
            device += ",romfile="  # no iPXE option ROM: faster boot
        for o in self.device_opts:
            device += "," + o
        serial = "stdio" if self.serial == "stdio" else f"file:{self._serial_file}"
        cmd = [
            QEMU_BIN, "-name", "vhostd-e2e",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-accel", accel,
            "-m", f"{self.mem_mb}M",
            "-object", f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
            "-numa", "node,memdev=mem",
            "-smp", self.smp_arg(accel),
            "-kernel", str(self.image.vmlinuz),
            "-initrd", str(initrd),
            "-append", self.kernel_cmdline(),
            "-chardev", chardev,
            "-netdev", netdev,
            "-device", device,
            "-serial", serial,
            "-no-reboot",
        ]
        if accel == "kvm":
            cmd += ["-cpu", "host"]
        return cmd + self.extra_args

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "Qemu":
        initrd = self.workdir / "initramfs-test.cpio.gz"
        make_initramfs(self.image.initramfs, initrd, self.test_script, self.extra_files)
        cmd = self.command(initrd)
        self.cmd = cmd
        if self.cpu_affinity:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(self.cpu_affinity)))] + cmd
        self._stderr_file = open(self.workdir / "qemu.stderr", "w+b")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.serial == "stdio" else subprocess.DEVNULL,
            stderr=self._stderr_file, cwd=self.workdir,
            start_new_session=True, preexec_fn=_set_pdeathsig)
        if self.serial == "stdio":
            self._reader = threading.Thread(target=self._read_stdout, daemon=True)
            self._reader.start()
        return self

    def _read_stdout(self) -> None:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            with self._lock:
                self._buf += chunk
            if self.echo:
                sys.stderr.write(chunk.decode("utf-8", "replace"))

    @property
    def log(self) -> str:
        if self.serial == "stdio":
            with self._lock:
                raw = bytes(self._buf)
        else:
            try:
                raw = self._serial_file.read_bytes()
            except OSError:
                raw = b""
        return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")

    @property
    def stderr(self) -> str:
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """Wait until ``pattern`` (regex) shows up on the console."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log)
            if m or not self.alive() or time.monotonic() > deadline:
                return m or rx.search(self.log)
            time.sleep(0.05)

    def wait(self, timeout: float = 120.0, exit_grace: float = 10.0) -> GuestResult:
        """Wait for the exit marker (or QEMU's exit, or the timeout), then make
        sure QEMU is gone. Returns the result; never raises on guest failure."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            if _EXIT_RE.search(self.log) or self.proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        extra = {}
        if not timed_out:
            # the guest powers off right after the marker
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=exit_grace)
        elif self.on_timeout is not None:
            try:
                extra["at_timeout"] = self.on_timeout()
            except Exception as e:  # diagnostics must not hide the failure
                extra["at_timeout"] = f"(diagnostics failed: {e!r})"
        self.kill()
        log = self.log
        m = _EXIT_RE.findall(log)
        self.result = GuestResult(
            rc=int(m[-1]) if m else None, log=log,
            elapsed=time.monotonic() - self._t0, qemu_rc=self.proc.returncode,
            timed_out=timed_out, qemu_stderr=self.stderr, extra=extra)
        return self.result

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._stderr_file:
            self._stderr_file.close()
            self._stderr_file = None

    def cleanup(self) -> None:
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Qemu":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def run_guest(image: GuestImage, socket_path: str | os.PathLike, test_script: str,
              timeout: float = 120.0, **kwargs) -> GuestResult:
    """Boot a guest running ``test_script`` and return its result (QEMU is gone)."""
    q = Qemu(image, socket_path, test_script=test_script, **kwargs)
    try:
        q.start()
        return q.wait(timeout)
    finally:
        q.cleanup()


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


# --------------------------------------------------------------------------- #
# guest-side scripts


def net_test_script(url: str, sha256: str, size: int | None = None,
                    host_ip: str = HOST_IP, ping_wait: int = 30) -> str:
    """/test.sh: wait for the host to answer pings, ping 3 times, download ``url``
    to /tmp, check its sha256 (and size), print timings. Exit codes:
    10 host never answered, 11 ping failed, 12 download failed,
    13 size mismatch, 14 sha256 mismatch."""
    size_check = ""
    if size is not None:
        size_check = f"""
if [ "$bytes" != "{size}" ]; then echo "T: FAIL size $bytes != {size}"; exit 13; fi"""
    return f"""#!/bin/sh
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "T: waiting for {host_ip}"
ok=0
i=0
while [ $i -lt {ping_wait} ]; do
    if ping -c 1 -W 1 {host_ip} >/dev/null 2>&1; then ok=1; break; fi
    i=$((i+1))
done
if [ $ok != 1 ]; then
    echo "T: FAIL no reply from {host_ip}"; ip addr; ip neigh; cat /proc/net/dev; exit 10
fi
ping -c 3 -i 0.2 -W 2 {host_ip} || {{ echo "T: FAIL ping"; exit 11; }}
echo "VHOSTD-PING=ok"
t0=$(up)
if ! wget -q -O /tmp/payload {url}; then
    echo "T: FAIL wget {url}"; cat /proc/net/dev; exit 12
fi
t1=$(up)
bytes=$(wc -c </tmp/payload)
echo "VHOSTD-DOWNLOAD-BYTES=$bytes"
echo "VHOSTD-DOWNLOAD-SECONDS=$(awk "BEGIN {{ printf \\"%.2f\\", $t1 - $t0 }}")"
echo "VHOSTD-DOWNLOAD-MBPS=$(awk "BEGIN {{ d = $t1 - $t0; if (d <= 0) d = 0.01; printf \\"%.1f\\", $bytes * 8 / d / 1000000 }}")"{size_check}
sum=$(sha256sum /tmp/payload | cut -d' ' -f1)
echo "VHOSTD-SHA256=$sum"
if [ "$sum" != "{sha256}" ]; then echo "T: FAIL sha256 $sum != {sha256}"; exit 14; fi
rm -f /tmp/payload
echo "T: PASS"
exit 0
"""
