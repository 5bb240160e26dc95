"""End-to-end harness for vhostd: a QEMU guest with a vhost-user virtio-net card.

Standard library only. This module owns the QEMU side:

* ``Qemu`` / ``run_guest()``: boots the guest against a vhost-user socket, waits
  for ``VHOSTD-TEST-EXIT=<rc>`` on the serial console, always kills QEMU;
  ``GuestResult`` is what a run returns.
* ``net_test_script()``: the guest-side ping + download + sha256 check.

The rest of the harness lives next to it and is re-exported here, so the tests
reach everything as ``guest.<name>``:

* guest_image.py: ``build_guest()``, ``make_initramfs()`` (the newc cpio writer).
* procs.py: ``BackgroundProcess``, ``wait_for_socket()``, ``NetNS``,
  ``HttpFileServer``, ``dpdk_reference_backend()``, ``ensure_apt_packages()``,
  ``tail()`` and the address plan (198.18.0.0/24, inside our own namespaces).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The e2e modules import each other top-level: conftest.py puts tests/e2e on sys.path.
# _set_pdeathsig and _kill_group are used by test_dpdk_virtio_user.py as well.
from guest_image import (
    BUILD_SCRIPT,
    REPO_ROOT,
    GuestImage,
    build_guest,
    default_guest_dir,
    make_initramfs,
    newc_archive,
)
from procs import (
    DEFAULT_FILE_SIZE,
    GUEST_IP,
    HOST_IP,
    PREFIX_LEN,
    BackgroundProcess,
    HttpFileServer,
    NetNS,
    dpdk_reference_backend,
    ensure_apt_packages,
    netns_name,
    tail,
    wait_for_socket,
    _kill_group,
    _set_pdeathsig,
)

__all__ = [
    "BUILD_SCRIPT",
    "DEFAULT_FILE_SIZE",
    "EXIT_MARKER",
    "GUEST_IP",
    "HOST_IP",
    "PREFIX_LEN",
    "QEMU_BIN",
    "REPO_ROOT",
    "BackgroundProcess",
    "GuestImage",
    "GuestResult",
    "HttpFileServer",
    "NetNS",
    "Qemu",
    "build_guest",
    "default_accel",
    "default_guest_dir",
    "dpdk_reference_backend",
    "ensure_apt_packages",
    "make_initramfs",
    "net_test_script",
    "netns_name",
    "newc_archive",
    "run_guest",
    "tail",
    "wait_for_socket",
]

EXIT_MARKER = "VHOSTD-TEST-EXIT="
_EXIT_RE = re.compile(r"VHOSTD-TEST-EXIT=(\d+)")
QEMU_BIN = os.environ.get("VHOSTD_QEMU", "qemu-system-x86_64")


def default_accel() -> str:
    """Accelerator for QEMU: env VHOSTD_ACCEL, default tcg (/dev/kvm hangs here)."""
    return os.environ.get("VHOSTD_ACCEL", "tcg") or "tcg"


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