#!/usr/bin/env python3
"""Guest-to-TAP with 64 KB TSO frames on one queue pair, for docs/notes/perf-changes.md.

    python3 bench/gso_tx.py [--seconds 5] [--size 65000] [--syscall] [--cpu 1]

Run as root from the repository (it uses vhostd's C extension and the test
suite's guest-side ring driver). A real TAP in a throw-away network namespace
(IFF_VNET_HDR, 12-byte header), one queue pair with VERSION_1 + CSUM + HOST_TSO4
acked, a split TX ring of 256 whose descriptors point at pre-built
IPv4/TCP frame of --size bytes (128 copies, 8 MB) with a GSO header (TCPV4, gso_size 1448,
NEEDS_CSUM). The guest side (this Python process) keeps the ring full; the C
worker writes each frame to the TAP as one GSO skb. Printed: frames and Gbit/s
the TAP counted (rx_packets/rx_bytes), and the worker thread's own CPU time, so
that Gbit/s per worker CPU-second is the capacity of one queue pair whatever
the Python side manages to post. Frames go to a foreign MAC, as in
bench/run.py, so the kernel drops them after the TAP has accounted them.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vhostd import tap as taplib  # noqa: E402
from vhostd._native import ffi, lib  # noqa: E402
from tests.driver import GuestMemory, SplitRing  # noqa: E402


NBUF = 128                                      # 128 x 64 KB = 8 MB of frames


def thread_cpu(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tap_counters(ns: str, ifname: str) -> tuple[int, int]:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname], capture_output=True,
                         text=True, check=True).stdout
    st = json.loads(out)[0]["stats64"]["rx"]
    return st["packets"], st["bytes"]


def tso_frame(size: int) -> bytes:
    ip_len = size - 14
    eth = bytes.fromhex("020000000002" "020000000001" "0800")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0x4000, 64, 6, 0, bytes([198, 18, 0, 1]),
                     bytes([198, 18, 0, 2]))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x10, 65535, 0, 0)
    return eth + ip + tcp + bytes(size - 54)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=65000, help="frame bytes (Ethernet + IPv4 + TCP + payload)")
    ap.add_argument("--syscall", action="store_true", help="readv/writev mode instead of io_uring")
    ap.add_argument("--cpu", type=int, default=None, help="pin the worker to this CPU")
    args = ap.parse_args()
    ns = f"gso-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    tap = None
    qp = ffi.NULL
    mem = GuestMemory(64 << 20)
    maps = []
    try:
        tap = taplib.open_tap("gso0", ns)
        taplib.set_vnet_hdr_len(tap.fds[0], 12)
        taplib.configure_link(tap, 9000)
        cmem = ffi.new("struct vr_mem *")
        for i, (gpa, size, uva, off, fd) in enumerate(mem.regions()):
            a = ffi.new("uint64_t *")
            assert lib.vr_mmap(fd, size + off, a) == 0
            maps.append((a[0], size + off))
            r = cmem.regions[i]
            r.gpa, r.uva, r.size, r.hva = gpa, uva, size, a[0] + off
        cmem.nregions = len(maps)
        before = set(os.listdir("/proc/self/task"))
        qp = lib.vr_qp_new(cmem, tap.fds[0].fd, lib.VR_IO_SYSCALL if args.syscall else lib.VR_IO_URING)
        assert qp != ffi.NULL
        worker = int((set(os.listdir("/proc/self/task")) - before).pop())
        if args.cpu is not None:
            assert lib.vr_qp_set_cpu(qp, args.cpu) == 0
        num = 256
        ring = SplitRing(mem, num)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        feats = (1 << lib.VR_F_VERSION_1) | (1 << lib.VR_F_CSUM) | (1 << lib.VR_F_HOST_TSO4)
        assert lib.vr_qp_pause(qp) == 0
        assert lib.vr_qp_set_features(qp, feats, 12) == 0
        assert lib.vr_qp_set_num(qp, lib.VR_TX, num) == 0
        assert lib.vr_qp_set_addr(qp, lib.VR_TX, ring.desc_uva, ring.avail_uva, ring.used_uva) == 0
        assert lib.vr_qp_set_kick(qp, lib.VR_TX, kick) == 0
        assert lib.vr_qp_set_started(qp, lib.VR_TX, 1) == 0
        assert lib.vr_qp_set_enabled(qp, lib.VR_TX, 1) == 0
        assert lib.vr_qp_map(qp) == 0
        assert lib.vr_qp_resume(qp) == 0

        hdr = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)    # NEEDS_CSUM, TCPV4
        blob = hdr + tso_frame(args.size)
        bufs = []
        for _ in range(NBUF):                   # distinct frames: not all of them cache-hot
            bufs.append(mem.alloc(len(blob), 4096))
            mem.write(bufs[-1], blob)
        for i in range(num):
            ring.write_desc(i, bufs[i % NBUF], len(blob), 0, 0)
        posted = 0
        mode = "io_uring" if lib.vr_qp_io_mode(qp) == lib.VR_IO_URING else "readv/writev"

        def fill():
            nonlocal posted
            used = ring.used_idx()
            room = num - ((posted - used) & 0xFFFF)
            for _ in range(room):
                ring.push_avail(posted % num)
                posted += 1
            if room:
                ring.publish()
                os.eventfd_write(kick, 1)

        t_end = time.monotonic() + 1.0          # warm-up
        while time.monotonic() < t_end:
            fill()
        p0, b0 = tap_counters(ns, "gso0")
        c0, t0 = thread_cpu(worker), time.monotonic()
        while time.monotonic() < t0 + args.seconds:
            fill()
        p1, b1 = tap_counters(ns, "gso0")
        c1, t1 = thread_cpu(worker), time.monotonic()
        st = lib.vr_qp_stats(qp, lib.VR_TX)
        frames, dt, cpu = p1 - p0, t1 - t0, c1 - c0
        print(f"64K TSO TX ({mode}, {args.size} B frames): {frames / dt:.0f} frames/s, "
              f"{(b1 - b0) * 8 / dt / 1e9:.1f} Gbit/s achieved, worker CPU {cpu / dt * 100:.0f}%, "
              f"{cpu / frames * 1e6 if frames else 0:.2f} us worker CPU/frame, "
              f"{(b1 - b0) * 8 / cpu / 1e9 if cpu else 0:.1f} Gbit/s per worker CPU-second; "
              f"drops: hdr {st.drop_bad_hdr} tap_busy {st.drop_tap_busy} tap_error {st.drop_tap_error}")
        return 0
    finally:
        if qp != ffi.NULL:
            lib.vr_qp_free(qp)
        for a, n in maps:
            lib.vr_munmap(a, n)
        if tap is not None:
            tap.close()
        mem.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
