"""Tests for the datapath's performance options: the TAP I/O mode
(io_uring bursts, with the readv/writev fallback when io_uring is unavailable),
the busy-poll window (--busy-poll-us / busy_poll_us) and worker CPU placement
(--cpu-affinity / cpu_affinity), from the C API up to the command line.

The datapath cases reuse tests/datapath/harness.py's Dev (guest rings in memfd
memory, a SOCK_SEQPACKET socketpair standing in for the TAP).
"""
from __future__ import annotations

import argparse
import errno
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from vhostd import device
from vhostd._native import ffi, lib
from vhostd.cli import daemon_config, vhostd_parser
from vhostd.config import PortConfig, check_port, load_config, parse_cpus
from vhostd.errors import SetupError

from tests.conftest import ROOT, DaemonProcess
from tests.datapath.harness import F_V1, F_PACKED, Dev, eth_frame, wait_for
from tests.driver import net_hdr


def _uring_works() -> bool:
    d = Dev()
    try:
        return lib.vr_qp_io_mode(d.qp) == lib.VR_IO_URING
    finally:
        d.close()


@pytest.fixture(params=["uring", "syscall"])
def io_mode(request):
    """Runs a test once per TAP I/O mode (each queue pair is created in it)."""
    if request.param == "uring" and not _uring_works():
        pytest.skip("io_uring_setup() fails here: only the syscall mode can run")
    return lib.VR_IO_URING if request.param == "uring" else lib.VR_IO_SYSCALL


@pytest.fixture
def dev(io_mode):
    devs = []

    def make(**kw):
        d = Dev(io_mode=io_mode, **kw)
        devs.append(d)
        assert lib.vr_qp_io_mode(d.qp) == io_mode
        return d
    yield make
    for d in devs:
        d.close()


# ------------------------------------------------------------------ I/O mode

def test_io_mode_switch_and_reason():
    d = Dev(io_mode=lib.VR_IO_SYSCALL)
    try:
        assert lib.vr_qp_io_mode(d.qp) == lib.VR_IO_SYSCALL
        assert lib.vr_qp_io_error(d.qp) == 0        # not tried: no error to report

        class QP:
            ptr = d.qp
        assert device.io_mode_line([QP]) == "TAP I/O: readv/writev, one syscall per frame (tap_io = syscall)"
    finally:
        d.close()
    assert lib.vr_qp_new(ffi.new("struct vr_mem *"), -1, 7) == ffi.NULL     # unknown mode
    d = Dev()
    try:
        mode, err = lib.vr_qp_io_mode(d.qp), lib.vr_qp_io_error(d.qp)
        assert mode in (lib.VR_IO_URING, lib.VR_IO_SYSCALL)
        # Either io_uring works or the reason it does not is kept for the log line.
        assert (mode == lib.VR_IO_URING) == (err == 0)
    finally:
        d.close()


@pytest.mark.parametrize("features", [F_V1, F_V1 | F_PACKED], ids=["split", "packed"])
def test_tx_bursts_in_order_with_drops(dev, features):
    """More frames than one burst, of mixed layouts, with invalid headers in
    between: the good ones reach the TAP in ring order, the bad ones are counted,
    every chain is returned used."""
    d = dev(features=features)
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    sent, bad, used = [], 0, 0
    for half in range(2):
        for i in range(100 * half, 100 * half + 100):
            frame = eth_frame(60 + (i * 37) % 1400, i)
            if i % 17 == 5:
                d.tx.add_out([net_hdr(flags=0x80) + frame])       # flag bits TX may not set
                bad += 1
            elif i % 3 == 0:
                d.tx.add_out([net_hdr(), frame[:20], frame[20:]])  # header and frame split
                sent.append(frame)
            else:
                d.tx.add_out([net_hdr() + frame])
                sent.append(frame)
        d.tx.publish()
        d.tx.kick()
        got = d.tx.wait_used(100)
        assert len(got) == 100 and all(u.len == 0 for u in got)
        used += len(got)
    for frame in sent:
        assert d.recv_tap() == net_hdr() + frame
    assert d.tap_empty()
    s = d.stats(lib.VR_TX)
    assert s["packets"] == len(sent) and s["drop_bad_hdr"] == bad and used == 200
    assert s["bytes"] == sum(len(f) for f in sent)
    assert s["broken"] == 0


def test_tx_used_only_after_the_tap_has_the_frame(dev):
    """Zero copy: a chain may be returned used only once its write completed, so
    whenever the guest sees N used entries the TAP already holds N frames."""
    d = dev()
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    n = 120
    for i in range(n):
        d.tx.add_out([net_hdr() + eth_frame(64, i)])
    d.tx.publish()
    d.tx.kick()
    got = 0
    deadline = time.monotonic() + 5
    while got < n:
        assert time.monotonic() < deadline, f"{got}/{n} used"
        used = d.tx.get_used()
        for _ in used:                  # each of them is already readable on the TAP
            assert d.peer.recv(2048, socket.MSG_DONTWAIT) == net_hdr() + eth_frame(64, got)
            got += 1


def test_tx_tap_busy_and_error_counted_per_frame(dev):
    d = dev()
    d.tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    n = 100
    for i in range(n):
        d.tx.add_out([net_hdr() + eth_frame(1000, i)])
    d.tx.publish()
    d.tx.kick()
    wait_for(lambda: (lambda s: s["packets"] + s["drop_tap_busy"] == n)(d.stats(lib.VR_TX)), what="all counted")
    s = d.stats(lib.VR_TX)
    assert s["drop_tap_busy"] > 0 and s["drop_tap_error"] == 0
    while not d.tap_empty(0):
        d.recv_tap()
    d.peer.close()                      # EPIPE from now on: drop_tap_error, once per frame
    for i in range(3):
        d.tx.add_out([net_hdr() + eth_frame(60, i)])
    d.tx.publish()
    d.tx.kick()
    wait_for(lambda: d.stats(lib.VR_TX)["drop_tap_error"] == 3, what="errors counted")
    d.peer = socket.socket()            # Dev.close() closes it


SECCOMP_CHILD = textwrap.dedent(r'''
    import ctypes, errno, os, sys
    sys.path.insert(0, sys.argv[1])
    sc = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    sc.seccomp_init.restype = ctypes.c_void_p
    sc.seccomp_init.argtypes = [ctypes.c_uint32]
    sc.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    sc.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    sc.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = sc.seccomp_init(0x7FFF0000)                      # allow everything ...
    nr = sc.seccomp_syscall_resolve_name(b"io_uring_setup")
    assert sc.seccomp_rule_add(ctx, 0x00050000 | errno.EPERM, nr, 0) == 0   # ... but io_uring
    assert sc.seccomp_load(ctx) == 0
    from vhostd import device
    from vhostd._native import lib
    from tests.datapath.harness import Dev, eth_frame, wait_for
    from tests.driver import net_hdr
    d = Dev()
    assert lib.vr_qp_io_mode(d.qp) == lib.VR_IO_SYSCALL, lib.vr_qp_io_mode(d.qp)
    assert lib.vr_qp_io_error(d.qp) == errno.EPERM, lib.vr_qp_io_error(d.qp)
    class QP:
        ptr = d.qp
    print(device.io_mode_line([QP]))
    for i in range(5):
        d.send([net_hdr() + eth_frame(60, i)])
    for i in range(5):
        assert d.recv_tap() == net_hdr() + eth_frame(60, i)
    wait_for(lambda: d.stats(lib.VR_TX)["packets"] == 5)
    d.close()
    print("ok")
''')


def test_io_uring_denied_by_seccomp_falls_back():
    """io_uring_setup refused (EPERM, as a seccomp filter or
    kernel.io_uring_disabled does): the queue pair runs on readv/writev, says
    why, and moves frames."""
    try:
        import ctypes
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 is missing")
    r = subprocess.run([sys.executable, "-c", SECCOMP_CHILD, str(ROOT)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "TAP I/O: readv/writev, one syscall per frame (io_uring unavailable: Operation not permitted)", "ok"]


# ------------------------------------------------------------------ busy poll

def test_busy_poll_limits_and_pause_rule():
    d = Dev()
    try:
        assert lib.vr_qp_set_busy_poll(d.qp, 10) == -errno.EBUSY          # not paused
        with d.paused():
            assert lib.vr_qp_set_busy_poll(d.qp, lib.VR_MAX_BUSY_POLL_US + 1) == -errno.EINVAL
            assert lib.vr_qp_set_busy_poll(d.qp, lib.VR_MAX_BUSY_POLL_US) == 0
            assert lib.vr_qp_set_busy_poll(d.qp, 0) == 0
    finally:
        d.close()


def test_busy_poll_takes_frames_without_a_kick(dev):
    """Inside the window after traffic the worker polls the ring: a frame the
    guest posts without kicking still goes out. Without busy polling it waits
    for the kick (so the first half of this test can fail)."""
    d = dev()
    d.send([net_hdr() + eth_frame(60, 0)])
    assert d.recv_tap() == net_hdr() + eth_frame(60, 0)
    # Let the worker finish that burst: after re-arming notifications it looks at
    # the ring once more, and a frame posted before that look would rightly go out.
    time.sleep(0.3)
    d.tx.add_out([net_hdr() + eth_frame(60, 1)])
    d.tx.publish()                                   # no kick
    assert d.tap_empty(0.3)
    d.tx.kick()
    assert d.recv_tap() == net_hdr() + eth_frame(60, 1)

    d2 = dev()
    with d2.paused():
        assert lib.vr_qp_set_busy_poll(d2.qp, lib.VR_MAX_BUSY_POLL_US) == 0
    d2.send([net_hdr() + eth_frame(60, 2)])
    assert d2.recv_tap() == net_hdr() + eth_frame(60, 2)
    d2.tx.add_out([net_hdr() + eth_frame(60, 3)])
    d2.tx.publish()                                  # no kick: found by polling
    assert d2.recv_tap(timeout=0.9) == net_hdr() + eth_frame(60, 3)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def test_busy_poll_window_ends_and_the_port_sleeps(dev):
    """After the window the worker sleeps in epoll again: the process uses next
    to no CPU while the port is idle (a worker still polling would use ~1 CPU)."""
    d = dev()
    with d.paused():
        assert lib.vr_qp_set_busy_poll(d.qp, 20000) == 0     # 20 ms
    d.send([net_hdr() + eth_frame(60, 0)])
    assert d.recv_tap() == net_hdr() + eth_frame(60, 0)
    time.sleep(0.2)                                          # the window is over
    before = _cpu_seconds()
    time.sleep(1.0)
    assert _cpu_seconds() - before < 0.2


# ------------------------------------------------------------ CPU placement

def _thread_cpus() -> dict[int, str]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        out[int(tid)] = line.split(":", 1)[1].strip()
        except FileNotFoundError:
            pass
    return out


def test_cpu_affinity_pins_the_worker():
    usable = sorted(os.sched_getaffinity(0))
    cpu = usable[-1]
    d = Dev()
    try:
        before = _thread_cpus()
        assert lib.vr_qp_set_cpu(d.qp, cpu) == 0
        after = _thread_cpus()
        pinned = [t for t, cpus in after.items() if cpus == str(cpu) and before.get(t) != str(cpu)]
        if len(usable) > 1:
            assert len(pinned) == 1, (before, after)
        assert lib.vr_qp_set_cpu(d.qp, -1) == 0
        if len(usable) > 1:
            assert _thread_cpus()[pinned[0]] != str(cpu)
        d.send([net_hdr() + eth_frame(60, 0)])
        assert d.recv_tap() == net_hdr() + eth_frame(60, 0)
        assert lib.vr_qp_set_cpu(d.qp, 100000) == -errno.EINVAL
        assert lib.vr_qp_set_cpu(d.qp, -2) == -errno.EINVAL
        missing = next(c for c in range(1024) if c not in usable)
        assert lib.vr_qp_set_cpu(d.qp, missing) == -errno.EINVAL
    finally:
        d.close()


# ------------------------------------------------------------ configuration

def test_port_config_validation():
    base = dict(socket="/tmp/x.sock", tap="t0")
    assert check_port(PortConfig(**base, busy_poll_us=50)).busy_poll_us == 50
    with pytest.raises(SetupError, match=r"busy_poll_us 1000001 out of range \(0\.\.1000000\)"):
        check_port(PortConfig(**base, busy_poll_us=1_000_001))
    with pytest.raises(SetupError, match="busy_poll_us -1 out of range"):
        check_port(PortConfig(**base, busy_poll_us=-1))
    usable = os.sched_getaffinity(0)
    missing = next(c for c in range(4096) if c not in usable)
    with pytest.raises(SetupError, match=f"cpu_affinity: CPU {missing} is not available to vhostd"):
        check_port(PortConfig(**base, cpu_affinity=(min(usable), missing)))
    if len(usable) > 1:
        with pytest.raises(SetupError, match="cpu_affinity lists a CPU twice"):
            check_port(PortConfig(**base, cpu_affinity=(min(usable), min(usable))))
    assert check_port(PortConfig(**base, cpu_affinity=(min(usable),))).cpu_affinity == (min(usable),)


def test_parse_cpus():
    assert parse_cpus("2,3") == (2, 3)
    assert parse_cpus("0-3,6") == (0, 1, 2, 3, 6)
    for bad in ("", "a", "3-1", "-1", "1,,2", "1-"):
        with pytest.raises(SetupError, match="is not a CPU list"):
            parse_cpus(bad)


def test_config_file_keys(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    f = tmp_path / "v.toml"
    f.write_text(f'[[port]]\nsocket = "/tmp/a.sock"\ntap = "a0"\nbusy_poll_us = 30\ncpu_affinity = [{cpu}]\n')
    p = load_config(str(f)).ports[0]
    assert p.busy_poll_us == 30 and p.cpu_affinity == (cpu,)
    for text, msg in (('busy_poll_us = "30"', "busy_poll_us must be a int"),
                      ('cpu_affinity = 1', "cpu_affinity must be a list"),
                      ('cpu_affinity = []', "cpu_affinity must be a non-empty list of CPU numbers"),
                      ('cpu_affinity = ["1"]', "cpu_affinity must be a non-empty list of CPU numbers"),
                      ('busy_poll_us = 2000000', "busy_poll_us 2000000 out of range")):
        f.write_text(f'[[port]]\nsocket = "/tmp/a.sock"\ntap = "a0"\n{text}\n')
        with pytest.raises(SetupError, match=msg):
            load_config(str(f))


def test_command_line_options(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    args = vhostd_parser().parse_args(["--socket", "/tmp/s", "--tap", "t0", "--control", "",
                                       "--busy-poll-us", "40", "--cpu-affinity", str(cpu)])
    cfg, _ = daemon_config(args)
    assert cfg.ports[0].busy_poll_us == 40 and cfg.ports[0].cpu_affinity == (cpu,)
    with pytest.raises(SystemExit):
        vhostd_parser().parse_args(["--busy-poll-us", "1000001"])
    f = tmp_path / "v.toml"
    f.write_text('[[port]]\nsocket = "/tmp/a.sock"\ntap = "a0"\n')
    args = vhostd_parser().parse_args(["--config", str(f), "--busy-poll-us", "10"])
    with pytest.raises(SetupError, match="use the busy_poll_us, cpu_affinity, tap_io and tx_copy_max keys"):
        daemon_config(args)
    args = vhostd_parser().parse_args(["--socket", "/tmp/s", "--tap", "t0", "--cpu-affinity", "x"])
    with pytest.raises(SetupError, match="is not a CPU list"):
        daemon_config(args)
    # TAP I/O mode and TX copy threshold: per port, flags or config keys
    args = vhostd_parser().parse_args(["--socket", "/tmp/s", "--tap", "t0", "--control", "",
                                       "--tap-io", "syscall", "--tx-copy-max", "0"])
    cfg, _ = daemon_config(args)
    assert (cfg.ports[0].tap_io, cfg.ports[0].tx_copy_max) == ("syscall", 0)
    for bad in (["--tap-io", "fast"], ["--tx-copy-max", "513"], ["--tx-copy-max", "-1"]):
        with pytest.raises(SystemExit):
            vhostd_parser().parse_args(["--socket", "/tmp/s", "--tap", "t0", *bad])
    f.write_text('[[port]]\nsocket = "/tmp/a.sock"\ntap = "a0"\ntap_io = "syscall"\ntx_copy_max = 128\n')
    port = load_config(str(f)).ports[0]
    assert (port.tap_io, port.tx_copy_max) == ("syscall", 128)
    for key, value, msg in (("tap_io", '"uring"', "tap_io 'uring' is not one of auto, syscall"),
                            ("tx_copy_max", "600", "tx_copy_max 600 out of range")):
        f.write_text(f'[[port]]\nsocket = "/tmp/a.sock"\ntap = "a0"\n{key} = {value}\n')
        with pytest.raises(SetupError, match=msg):
            load_config(str(f))


def test_daemon_tap_io_syscall_and_tx_copy_max(tmp_path, netns):
    """--tap-io syscall creates the queue pairs in syscall mode (the log line says why);
    --tx-copy-max 0 is accepted by every worker (configure_workers fails the start
    otherwise)."""
    d = DaemonProcess(tmp_path, netns, "vpo1", "--tap-io", "syscall", "--tx-copy-max", "0")
    try:
        d.wait_ready()
        wait_for(lambda: "TAP I/O:" in d.log(), what="I/O mode log line")
        assert "port vpo1: TAP I/O: readv/writev, one syscall per frame (tap_io = syscall)" in d.log()
    finally:
        assert d.stop() == 0


def test_daemon_logs_io_mode_and_applies_options(tmp_path, netns):
    cpu = max(os.sched_getaffinity(0))
    d = DaemonProcess(tmp_path, netns, "vpo0", "--busy-poll-us", "25", "--cpu-affinity", str(cpu))
    try:
        d.wait_ready()
        wait_for(lambda: "TAP I/O:" in d.log(), what="I/O mode log line")
        lines = [l for l in d.log().splitlines() if "TAP I/O:" in l]
        assert len(lines) == 1 and "port vpo0: TAP I/O: " in lines[0], lines
        assert ("io_uring (one io_uring_enter per TX burst)" in lines[0]
                or "readv/writev, one syscall per frame" in lines[0]), lines
        pinned = []
        for tid in os.listdir(f"/proc/{d.proc.pid}/task"):
            with open(f"/proc/{d.proc.pid}/task/{tid}/status") as fh:
                if any(l.split(":", 1)[1].strip() == str(cpu) for l in fh if l.startswith("Cpus_allowed_list:")):
                    pinned.append(tid)
        assert pinned
    finally:
        assert d.stop() == 0, d.log()


def test_daemon_refuses_an_unavailable_cpu(tmp_path, netns):
    missing = next(c for c in range(4096) if c not in os.sched_getaffinity(0))
    d = DaemonProcess(tmp_path, netns, "vpo1", "--cpu-affinity", f"0,{missing}")
    rc = d.proc.wait(30)
    assert rc == 1
    assert f"vhostd: error: cpu_affinity: CPU {missing} is not available to vhostd" in d.log()
    d.stop()


def test_tap_released_when_the_queue_pair_is_freed(netns):
    """The io_uring ring holds the TAP fd as a registered file; freeing the queue
    pair must drop it at once, so that the TAP can be opened again right after
    its fd is closed (a port reopening after a reload or a restart)."""
    from vhostd import tap as taplib
    mem = ffi.new("struct vr_mem *")
    for _ in range(5):
        tap = taplib.open_tap("vpr0", netns)
        qp = lib.vr_qp_new(mem, tap.fds[0].fd, lib.VR_IO_URING)
        assert qp != ffi.NULL
        lib.vr_qp_free(qp)
        tap.close()
    tap = taplib.open_tap("vpr0", netns)        # SetupError "TAP vpr0 is busy" if still held
    tap.close()
