"""Hostile vhost-user messages against one real vhostd process (exact payload sizes
and fd counts, bounded indices and regions, repeated set-up releasing the previous
one: what the CVE history of vhost-user backends taught; the three validation layers of
protocol.py, dispatch.py and session.py).

One daemon serves two ports for the whole module. Each malformed request goes to
port A on a fresh connection (raw socket, SCM_RIGHTS fds) after the handshake
prefix it needs; for each one the test checks the expected outcome (a failed
REPLY_ACK status, an empty always-reply, or the connection closed), that the
daemon is alive, that no fd it was handed stays open, and that exactly one new
log line names the request and gives the reason. At the end port B, never
touched by the hostile frontends, must still carry traffic both ways, and the
figures are printed:

    malformed requests tried: N, distinct checks: M, daemon crashes: 0
"""
from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from tests.conftest import DaemonProcess, need_root, network_namespace, packet_socket
from tests.driver import constants as C
from tests.driver.frontend import (
    Frontend,
    Nack,
    pack_mem_table,
    pack_message,
    pack_region,
    pack_u64,
    pack_vring_addr,
    pack_vring_state,
)
from tests.driver.guestmem import GuestMemory
from tests.daemon.traffic import HDR, Guest, collect, frame, marker_of, vhostctl

NEED = C.VHOST_USER_VERSION | C.VHOST_USER_NEED_REPLY
UVA = 0x7F00_0000_0000          # tests.driver.guestmem's default uva base
MB = 1 << 20
ACK_PF = C.bits(C.PROTOCOL_F_REPLY_ACK, C.PROTOCOL_F_MQ, C.PROTOCOL_F_NET_MTU, C.PROTOCOL_F_LOG_SHMFD,
                C.PROTOCOL_F_RARP)
SPLIT_FEATURES = C.bits(C.VIRTIO_F_VERSION_1, C.VHOST_USER_F_PROTOCOL_FEATURES)
PACKED_FEATURES = SPLIT_FEATURES | C.bits(C.VIRTIO_F_RING_PACKED)


# --------------------------------------------------------------------- the daemon

@dataclass
class Env:
    d: DaemonProcess
    netns: str
    socket_b: str
    tap_b: str
    loop: str
    tried: int = 0
    checks: set = field(default_factory=set)
    crashes: int = 0


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def env(tmp_path_factory, request):
    need_root()
    tmp = tmp_path_factory.mktemp("hostile-msg")
    d = None
    with network_namespace() as netns:
        try:
            d = DaemonProcess(tmp, netns, "hmsga", loop=request.param).wait_ready()
            socket_b = str(tmp / "hmsgb.sock")
            r = vhostctl(d, "add-port", "--socket", socket_b, "--tap", "hmsgb", "--netns", netns)
            assert r.returncode == 0, r.stderr + d.log()
            yield Env(d, netns, socket_b, "hmsgb", request.param)
        finally:
            if d is not None:
                rc = d.stop()
                assert rc == 0, f"vhostd exited with {rc}:\n{d.log()}"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def idle_fds(env: Env) -> int:
    """The daemon's fd count once port A has no frontend (the previous one released)."""
    def idle():
        r = vhostctl(env.d, "ports", "--json")
        return r.returncode == 0 and not next(p for p in json.loads(r.stdout) if p["name"] == env.d.tap)["connected"]
    wait_until(idle, "port A to be idle")
    return fd_count(env.d.proc.pid)


def new_lines(d: DaemonProcess, since: int) -> list[str]:
    return d.log()[since:].splitlines()


def port_traffic(env: Env) -> None:
    """Port B carries a frame each way."""
    g = Guest(env.socket_b).setup()
    try:
        sock = packet_socket(env.netns, env.tap_b)
        g.send([frame(i, 200) for i in range(3)])
        assert sorted(collect(sock, 3)) == [0, 1, 2]
        g.post_rx(4)
        sock.send(frame(9, 300, b"BPR"))
        got: list = []
        while not any(marker_of(u.data[HDR:], b"BPR") == 9 for u in got):
            got += g.rx.wait_used(1)        # TimeoutError if the frame never comes
        sock.close()
    finally:
        g.close()


# ------------------------------------------------------------ handshake prefixes

def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def prefix_ack(fe: Frontend) -> None:
    """Protocol features with REPLY_ACK, owner."""
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features() & ACK_PF)
    fe.set_owner(need_reply=True)


def _prefix_mem(fe: Frontend, features: int, num: int) -> None:
    prefix_ack(fe)
    fe.set_features(features & fe.get_features(), need_reply=True)
    fe.mem = GuestMemory(4 * MB)
    fe.set_mem_table(fe.mem, need_reply=True)
    fe.set_vring_num(0, num, need_reply=True)


def prefix_mem(fe: Frontend) -> None:
    """+ split ring features, one 4 MiB memory region, vring 0 size 256."""
    _prefix_mem(fe, SPLIT_FEATURES, 256)


def prefix_packed(fe: Frontend) -> None:
    """+ packed ring features, one 4 MiB memory region, vring 0 size 100."""
    _prefix_mem(fe, PACKED_FEATURES, 100)


def prefix_noack(fe: Frontend) -> None:
    """Protocol features without REPLY_ACK: a refused request gets no reply at all."""
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features() & C.bits(C.PROTOCOL_F_MQ))
    fe.set_owner()


def prefix_preowner(fe: Frontend) -> None:
    """What QEMU sends before SET_OWNER (vhost_user_backend_init), and no SET_OWNER."""
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features() & ACK_PF)
    fe.get_queue_num()


PREFIXES = {"raw": lambda fe: None, "ack": prefix_ack, "noack": prefix_noack, "mem": prefix_mem,
            "packed": prefix_packed, "preowner": prefix_preowner}


# ------------------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    check: str                  # the validation rule it exercises (distinct checks)
    request: int | None         # None: the header names no known request
    message: Callable           # fe -> (bytes, fds to send)
    outcome: str                # "nack" | "empty" (always-reply, size 0) | "close" | "silent" (no reply)
    reason: str                 # regex the one log line must match
    prefix: str = "ack"
    fds: Callable = lambda: []  # fds to attach (created per run, closed by the test)


def msg(req, payload=b"", flags=NEED, size=None):
    return lambda fe: pack_message(req, payload, flags=flags, size=size)


CASES: list[Case] = []


def case(*a, **kw):
    CASES.append(Case(*a, **kw))


# --- header (protocol.py) ---
for flags, why in ((0x0, "version"), (0x2, "version"), (0x3, "version"),
                   (0x1 | C.VHOST_USER_REPLY, "REPLY flag"), (0x1 | 0x10, "unknown flag bits"),
                   (0x1 | 0x8000_0000, "unknown flag bits")):
    case(f"header-flags-{flags:#x}", "header flags" if "version" not in why else "header version",
         C.GET_FEATURES, msg(C.GET_FEATURES, flags=flags), "close", why, prefix="raw")
for size in (0x1001, 0x7FFF_FFFF, 0xFFFF_FFFF):
    case(f"header-size-{size:#x}", "header size <= max", C.GET_FEATURES,
         msg(C.GET_FEATURES, size=size), "close", "exceeds", prefix="raw")

# --- exact payload size per request (protocol.py) ---
U64_REQS = (C.SET_FEATURES, C.SET_PROTOCOL_FEATURES, C.NET_SET_MTU, C.SET_STATUS)
STATE_REQS = (C.SET_VRING_NUM, C.SET_VRING_BASE, C.GET_VRING_BASE, C.SET_VRING_ENABLE)
FILE_REQS = (C.SET_VRING_KICK, C.SET_VRING_CALL, C.SET_VRING_ERR)
EMPTY_REQS = (C.GET_FEATURES, C.SET_OWNER, C.RESET_OWNER, C.GET_PROTOCOL_FEATURES,
              C.GET_QUEUE_NUM, C.GET_STATUS)
for reqs, good, sizes in ((U64_REQS, 8, (0, 7, 9, 0x1000)), (STATE_REQS, 8, (0, 7, 9, 0x1000)),
                          (FILE_REQS, 8, (0, 7, 9, 0x1000)), ((C.SET_VRING_ADDR,), 40, (0, 39, 41, 0x1000)),
                          (EMPTY_REQS, 0, (1, 4, 9, 0x1000))):
    for req in reqs:
        for size in sizes:
            case(f"{C.REQUEST_NAMES[req]}-size-{size}", f"exact payload size ({C.REQUEST_NAMES[req]})",
                 req, msg(req, b"\0" * size), "close", f"payload is {size} bytes|got {size} bytes",
                 prefix="raw")

# --- memory table syntax (protocol.py): counts, sizes, overflow ---
R1 = (0, MB, UVA, 0)
for n in (0, 9, 0xFFFF_FFFF):
    case(f"mem-nregions-{n:#x}", "region count within limit", C.SET_MEM_TABLE,
         msg(C.SET_MEM_TABLE, struct.pack("=II", n, 0) + pack_region(*R1)), "close", "regions \\(1..8",
         prefix="raw")
for size in (0, 7, 8, 8 + 32 + 1, 8 + 32 * 8 + 8):
    case(f"mem-size-{size}", "mem table payload size", C.SET_MEM_TABLE,
         msg(C.SET_MEM_TABLE, (struct.pack("=II", 1, 0) + pack_region(*R1) * 9)[:size]), "close",
         "too short|bytes for 1 regions", prefix="raw")
for what, region in (("gpa", (2**64 - 0x1000, 0x2000, UVA, 0)), ("uva", (0, 0x2000, 2**64 - 0x1000, 0)),
                     ("mmap_offset", (0, 0x2000, UVA, 2**64 - 0x1000)), ("size0", (0, 0, UVA, 0))):
    case(f"mem-region-{what}", "region overflow / empty", C.SET_MEM_TABLE,
         msg(C.SET_MEM_TABLE, pack_mem_table([region])), "close", "overflows|size 0", prefix="raw",
         fds=lambda: [os.memfd_create("hm-region")])


# --- fd count per request (dispatch.py), unexpected fds closed ---
def memfd(size: int = MB) -> int:
    fd = os.memfd_create("hm-mem")
    os.ftruncate(fd, size)
    return fd


for req, payload, outcome in ((C.GET_FEATURES, b"", "empty"), (C.SET_FEATURES, pack_u64(0), "nack"),
                              (C.SET_OWNER, b"", "nack"), (C.SET_VRING_NUM, pack_vring_state(0, 256), "nack"),
                              (C.GET_VRING_BASE, pack_vring_state(0, 0), "empty"),
                              (C.SET_VRING_ADDR, pack_vring_addr(0, 0, 0, 0), "nack")):
    for n in (1, 3):
        case(f"{C.REQUEST_NAMES[req]}-{n}-fds", "fd count per request", req, msg(req, payload), outcome,
             f"{n} fds attached, expected 0..0", fds=lambda n=n: [eventfd() for _ in range(n)])
for req in FILE_REQS:
    name = C.REQUEST_NAMES[req]
    case(f"{name}-2-fds", "fd count per request", req, msg(req, pack_u64(0)), "nack",
         "2 fds attached, expected 0..1", fds=lambda: [eventfd(), eventfd()])
    case(f"{name}-missing-fd", "vring file: fd present unless no-fd", req, msg(req, pack_u64(0)), "nack",
         "no fd attached")
    case(f"{name}-nofd-with-fd", "vring file: fd present unless no-fd", req,
         msg(req, pack_u64(C.VRING_NOFD_MASK)), "nack",
         "fd attached with the no-fd flag|polling mode", fds=lambda: [eventfd()])
    case(f"{name}-not-eventfd", "vring file: fd is an eventfd", req, msg(req, pack_u64(0)), "nack",
         "not an eventfd", fds=lambda: [memfd()])
case("SET_MEM_TABLE-no-fd", "fd count per request", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([R1])), "nack", "0 fds attached, expected 1..8")
case("SET_MEM_TABLE-1-region-2-fds", "one fd per region", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([R1])), "nack", "1 memory regions but 2 fds",
     fds=lambda: [memfd(), memfd()])
case("SET_MEM_TABLE-2-regions-1-fd", "one fd per region", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([R1, (MB, MB, UVA + MB, 0)])), "nack",
     "2 memory regions but 1 fds", fds=lambda: [memfd()])
case("nine-fds", "at most 8 fds per message", C.SET_MEM_TABLE, msg(C.SET_MEM_TABLE, pack_mem_table([R1])),
     "close", "SET_MEM_TABLE: more than 8 fds", fds=lambda: [eventfd() for _ in range(9)])
for req in (C.SET_BACKEND_REQ_FD, C.SET_INFLIGHT_FD):
    case(f"{C.REQUEST_NAMES[req]}-unsupported-with-fd", "unsupported request, fd closed", req,
         msg(req, pack_u64(0)), "nack", "not supported", fds=lambda: [memfd()])
FAR = (1 << 40, MB, UVA + (1 << 40), 0)  # clear of any table the case starts with
case("ADD_MEM_REG-no-fd", "memory slot needs its fd", C.ADD_MEM_REG,
     msg(C.ADD_MEM_REG, pack_u64(0) + pack_region(*FAR)), "nack", "no fd attached")
case("ADD_MEM_REG-beyond-its-file", "memory slot inside its file, fd closed", C.ADD_MEM_REG,
     msg(C.ADD_MEM_REG, pack_u64(0) + pack_region(FAR[0], 4 * MB, FAR[2], 0)), "nack", "exceeds its file",
     fds=lambda: [memfd()])
case("ADD_MEM_REG-not-memory", "memory slot fd is guest memory, fd closed", C.ADD_MEM_REG,
     msg(C.ADD_MEM_REG, pack_u64(0) + pack_region(*FAR)), "nack", "not a regular file",
     fds=lambda: [eventfd()])
case("REM_MEM_REG-unknown", "removal of a region that is not there, fd closed", C.REM_MEM_REG,
     msg(C.REM_MEM_REG, pack_u64(0) + pack_region(*FAR)), "nack", "no memory region", fds=lambda: [memfd()])
case("RESET_DEVICE-not-negotiated", "protocol feature needed", C.RESET_DEVICE,
     msg(C.RESET_DEVICE, b""), "nack", "without the RESET_DEVICE protocol feature")

# --- live migration: the dirty log and the announce (session.py, dirty_log.py) ---
def _log(size, offset=0):
    return msg(C.SET_LOG_BASE, pack_u64(size) + pack_u64(offset))


for size in (0, 8, 17, 0x1000):
    case(f"SET_LOG_BASE-size-{size}", "exact payload size (SET_LOG_BASE)", C.SET_LOG_BASE,
         msg(C.SET_LOG_BASE, b"\0" * size), "close", f"payload is {size} bytes", prefix="raw")
case("SET_LOG_BASE-no-fd", "log: fd present", C.SET_LOG_BASE, _log(4096), "empty", "no log fd attached",
     prefix="mem")
for size, offset, why in ((0, 0, "multiples of 8"), (12, 0, "multiples of 8"), (4096, 4, "multiples of 8"),
                          (1 << 40, 0, "too large"), (4096, 1 << 40, "too large"),
                          (2 * MB, 0, "exceeds its file"), (4096, MB, "exceeds its file"),
                          (64, 0, "covers guest memory up to")):
    case(f"SET_LOG_BASE-{size:#x}-at-{offset:#x}", "log: size, offset, file, memory covered", C.SET_LOG_BASE,
         _log(size, offset), "empty", why, prefix="mem", fds=lambda: [memfd()])
case("SET_LOG_BASE-eventfd", "log: a memory file", C.SET_LOG_BASE, _log(4096), "empty", "not a memory file",
     prefix="mem", fds=lambda: [eventfd()])
case("SET_LOG_BASE-without-LOG_SHMFD", "log: protocol feature negotiated", C.SET_LOG_BASE, _log(4096),
     "empty", "without the LOG_SHMFD", prefix="noack", fds=lambda: [memfd()])
case("SET_LOG_FD-memfd", "log fd: an eventfd", C.SET_LOG_FD, msg(C.SET_LOG_FD, pack_u64(0)), "nack",
     "not an eventfd", fds=lambda: [memfd()])
case("SET_LOG_FD-payload-16", "log fd: payload", C.SET_LOG_FD, msg(C.SET_LOG_FD, b"\0" * 16), "nack",
     "payload of 16 bytes", fds=lambda: [eventfd()])
case("SET_LOG_FD-2-fds", "fd count per request", C.SET_LOG_FD, msg(C.SET_LOG_FD, pack_u64(0)), "nack",
     "2 fds attached, expected 0..1", fds=lambda: [eventfd(), eventfd()])
for mac in ("ffffffffffff", "010000000001", "000000000000"):
    case(f"SEND_RARP-{mac}", "announce: a unicast MAC", C.SEND_RARP,
         msg(C.SEND_RARP, bytes.fromhex(mac) + b"\0\0"), "nack", "not a unicast address")
case("SEND_RARP-without-RARP", "announce: protocol feature negotiated", C.SEND_RARP,
     msg(C.SEND_RARP, bytes.fromhex("525400000001") + b"\0\0"), "silent", "without the RARP", prefix="noack")
for size in (0, 6, 9):
    case(f"SEND_RARP-size-{size}", "exact payload size (SEND_RARP)", C.SEND_RARP,
         msg(C.SEND_RARP, b"\0" * size), "close", f"payload is {size} bytes", prefix="raw")
for rid in (0, 44, 0x99, 0xFFFF_FFFF):
    case(f"unknown-request-{rid:#x}", "unknown request id", None, msg(rid, b""), "nack",
         f"request {rid:#x} is not supported")

# --- vring index bounds on the full 32/64 bits (dispatch.py) ---
for req in (C.SET_VRING_NUM, C.SET_VRING_BASE, C.SET_VRING_ENABLE):
    for idx in (2, 0x100, 0x1_0000, 0x8000_0000, 0xFFFF_FFFF):
        case(f"{C.REQUEST_NAMES[req]}-index-{idx:#x}", "vring index bound (u32)", req,
             msg(req, pack_vring_state(idx, 1)), "nack", f"vring index {idx:#x} out of range")
for idx in (2, 0x1_0000, 0xFFFF_FFFF):
    case(f"GET_VRING_BASE-index-{idx:#x}", "vring index bound (u32)", C.GET_VRING_BASE,
         msg(C.GET_VRING_BASE, pack_vring_state(idx, 0)), "empty", f"vring index {idx:#x} out of range")
    case(f"SET_VRING_ADDR-index-{idx:#x}", "vring index bound (u32)", C.SET_VRING_ADDR,
         msg(C.SET_VRING_ADDR, pack_vring_addr(idx, 0, 0, 0)), "nack", f"vring index {idx:#x} out of range")
for req in FILE_REQS:
    for raw in (0x1_0000_0001, 0x200, 0x8000_0000_0000_0000):
        case(f"{C.REQUEST_NAMES[req]}-u64-{raw:#x}", "vring file reserved bits (u64)", req,
             msg(req, pack_u64(raw)), "nack", "reserved bits set", fds=lambda: [eventfd()])
    case(f"{C.REQUEST_NAMES[req]}-index-0xff", "vring index bound (u32)", req, msg(req, pack_u64(0xFF)),
         "nack", "vring index 0xff out of range", fds=lambda: [eventfd()])

# --- memory regions: meaning (memory.py) ---
case("mem-overlap-gpa", "regions overlap", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([(0, 2 * MB, UVA, 0), (MB, MB, UVA + 4 * MB, 0)])), "nack",
     "overlap: gpa", fds=lambda: [memfd(2 * MB), memfd()])
case("mem-overlap-uva", "regions overlap", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([(0, 2 * MB, UVA, 0), (4 * MB, MB, UVA + MB, 0)])), "nack",
     "overlap: uva", fds=lambda: [memfd(2 * MB), memfd()])
case("mem-overlap-same", "regions overlap", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([R1, R1])), "nack", "overlap: gpa", fds=lambda: [memfd(), memfd()])
case("mem-beyond-file", "region inside its file", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([(0, 4 * MB, UVA, 0)])), "nack", "exceeds its file",
     fds=lambda: [memfd(MB)])
case("mem-offset-beyond-file", "region inside its file", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([(0, MB, UVA, MB)])), "nack", "exceeds its file",
     fds=lambda: [memfd(MB)])
case("mem-fd-not-a-file", "region fd is a file", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([R1])), "nack", "not a regular file", fds=lambda: [eventfd()])


def disk_file(size: int = MB) -> int:
    """A regular file on the disk file system the repository lives on (not tmpfs or
    hugetlbfs): guest memory there could make a worker or the loop wait on I/O."""
    import tempfile
    fd, path = tempfile.mkstemp(prefix="hm-disk-", dir=os.path.dirname(os.path.abspath(__file__)))
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


case("mem-fd-on-disk", "region file is memory (tmpfs/hugetlbfs)", C.SET_MEM_TABLE,
     msg(C.SET_MEM_TABLE, pack_mem_table([R1])), "nack", "not guest memory", fds=lambda: [disk_file()])

# --- vring addresses (session.py): inside mapped memory, aligned ---
# prefix_mem: 4 MiB at gpa 0 / uva UVA, vring 0 of size 256 (desc 4 KiB, avail 518 B, used 2054 B).
GOOD = dict(desc=UVA + 0x10000, avail=UVA + 0x11000, used=UVA + 0x12000)


def addr_case(cid, check, reason, prefix="mem", **over):
    a = dict(GOOD, **over)
    case(cid, check, C.SET_VRING_ADDR,
         msg(C.SET_VRING_ADDR, pack_vring_addr(0, a["desc"], a["used"], a["avail"], a.get("flags", 0))),
         "nack", reason, prefix=prefix)


for part, off, align in (("desc", 8, 16), ("desc", 1, 16), ("avail", 1, 2), ("used", 2, 4)):
    addr_case(f"addr-split-{part}-misaligned-{off}", "vring address aligned", f"{part} address .* not {align}-byte",
              **{part: GOOD[part] + off})
for part, off, align in (("desc", 8, 16), ("avail", 2, 4), ("used", 2, 4)):
    addr_case(f"addr-packed-{part}-misaligned-{off}", "vring address aligned", f"{part} address .* not {align}-byte",
              prefix="packed", **{part: GOOD[part] + off})
for part in ("desc", "avail", "used"):
    addr_case(f"addr-{part}-unmapped", "vring inside guest memory", "not inside guest memory", **{part: 0x1000})
    addr_case(f"addr-{part}-past-end", "vring inside guest memory", "not inside guest memory",
              **{part: UVA + 4 * MB - 16})
    addr_case(f"addr-{part}-top", "vring inside guest memory", "not inside guest memory",
              **{part: 2**64 - 16})
addr_case("addr-packed-desc-past-end", "vring inside guest memory", "not inside guest memory",
          prefix="packed", desc=UVA + 4 * MB - 16 * 50)
addr_case("addr-flags", "vring address flags", "address flags 0x2 unknown", flags=2)

# --- queue sizes and bases (session.py) ---
for num in (0, 3, 255, 0x1_0000, 0x8001, 0xFFFF_FFFF):
    case(f"num-split-{num:#x}", "split queue size: power of 2 <= 32768", C.SET_VRING_NUM,
         msg(C.SET_VRING_NUM, pack_vring_state(0, num)), "nack", f"size {num:#x} invalid", prefix="mem")
for num in (0, 0x8001, 0xFFFF_FFFF):
    case(f"num-packed-{num:#x}", "packed queue size <= 32768", C.SET_VRING_NUM,
         msg(C.SET_VRING_NUM, pack_vring_state(0, num)), "nack", f"size {num:#x} invalid", prefix="packed")
case("base-split-0x10000", "split base < 2^16", C.SET_VRING_BASE,
     msg(C.SET_VRING_BASE, pack_vring_state(0, 0x1_0000)), "nack", "out of range for a split ring", prefix="mem")
for base in (100, 0x8000 | 150, (100 << 16) | 5):
    case(f"base-packed-{base:#x}", "packed base slots < size", C.SET_VRING_BASE,
         msg(C.SET_VRING_BASE, pack_vring_state(0, base)), "nack", "slot beyond size", prefix="packed")

# --- other values (session.py) ---
case("enable-2", "enable is 0 or 1", C.SET_VRING_ENABLE, msg(C.SET_VRING_ENABLE, pack_vring_state(0, 2)),
     "nack", "enable value 0x2")
case("features-not-offered", "features offered", C.SET_FEATURES, msg(C.SET_FEATURES, pack_u64(1 << 63)),
     "nack", "were not offered")
case("protocol-features-not-offered", "features offered", C.SET_PROTOCOL_FEATURES,
     msg(C.SET_PROTOCOL_FEATURES, pack_u64(1 << 40)), "nack", "were not offered")
case("status-0x100", "status fits 8 bits", C.SET_STATUS, msg(C.SET_STATUS, pack_u64(0x100)), "nack",
     "does not fit in 8 bits")
for mtu in (0, 67, 65536):
    case(f"mtu-{mtu}", "MTU range", C.NET_SET_MTU, msg(C.NET_SET_MTU, pack_u64(mtu)), "nack",
         f"MTU {mtu} out of range")


# --- ownership (dispatch.py Row.owner): what acts on the device waits for SET_OWNER ---
for req, payload, outcome, fds in (
        (C.SET_FEATURES, pack_u64(SPLIT_FEATURES), "nack", lambda: []),
        (C.SET_MEM_TABLE, pack_mem_table([R1]), "nack", lambda: [memfd()]),
        (C.ADD_MEM_REG, pack_u64(0) + pack_region(*R1), "nack", lambda: [memfd()]),
        (C.SET_VRING_NUM, pack_vring_state(0, 256), "nack", lambda: []),
        (C.GET_VRING_BASE, pack_vring_state(0, 0), "empty", lambda: []),
        (C.SET_VRING_KICK, pack_u64(0), "nack", lambda: [eventfd()]),
        (C.SET_VRING_CALL, pack_u64(0), "nack", lambda: [eventfd()]),
        (C.SET_LOG_BASE, pack_u64(4096) + pack_u64(0), "empty", lambda: [memfd()]),
        (C.SEND_RARP, bytes.fromhex("525400000001") + b"\0\0", "nack", lambda: []),
        (C.NET_SET_MTU, pack_u64(1500), "nack", lambda: []),
        (C.SET_STATUS, pack_u64(0xF), "nack", lambda: [])):
    name = C.REQUEST_NAMES[req]
    case(f"{name}-before-SET_OWNER", "owner required", req, msg(req, payload), outcome,
         f"{name} before SET_OWNER", prefix="preowner", fds=fds)

# --- without REPLY_ACK: refused silently (one log line), the connection lives on ---
case("noack-vring-index", "no REPLY_ACK: refused without reply", C.SET_VRING_NUM,
     msg(C.SET_VRING_NUM, pack_vring_state(0x1_0000, 256)), "silent", "vring index 0x10000 out of range",
     prefix="noack")
case("noack-extra-fd", "no REPLY_ACK: refused without reply", C.SET_OWNER, msg(C.SET_OWNER), "silent",
     "1 fds attached", prefix="noack", fds=lambda: [eventfd()])
case("noack-status", "no REPLY_ACK: refused without reply", C.SET_STATUS,
     msg(C.SET_STATUS, pack_u64(0x1FF)), "silent", "does not fit in 8 bits", prefix="noack")


# --------------------------------------------------------------------- the runner

def run_case(env: Env, c: Case) -> None:
    d = env.d
    pid = d.proc.pid
    fe = Frontend.connect(d.socket)
    mine: list[int] = []
    try:
        PREFIXES[c.prefix](fe)
        fds_before = fd_count(pid)
        log_at = len(d.log())
        mine = c.fds()
        data = c.message(fe)
        env.tried += 1
        env.checks.add(c.check)
        fe.send_raw(data, mine)
        if c.outcome == "close":
            assert fe.expect_closed(timeout=5.0), "connection stayed open"
        elif c.outcome == "silent":
            # the next reply on the socket must be the ping's, nothing for the refused request
            assert fe.ping(), "connection unusable after a refused request"
            assert fd_count(pid) == fds_before, "fds handed with a refused request stay open"
        else:
            rep = fe.reply(None if c.request is None else c.request)
            if c.outcome == "nack":
                assert rep.u64() != 0, "request was acknowledged"
            else:
                assert rep.payload == b"", f"expected an empty reply, got {rep.payload.hex()}"
            assert fe.ping(), "connection unusable after a refused request"
            assert fd_count(pid) == fds_before, "fds handed with a refused request stay open"
    finally:
        fe.close()
        for f in mine:
            os.close(f)
        if getattr(fe, "mem", None) is not None:
            fe.mem.close()
    if not d.alive():
        env.crashes += 1
        raise AssertionError(f"vhostd died:\n{d.log()}")
    # Wait for the port to have released that frontend (it then logs nothing more).
    wait_until(lambda: "frontend disconnected" in d.log()[log_at:] or c.outcome == "close"
               and "closing connection" in d.log()[log_at:], "the session to end")
    name = C.REQUEST_NAMES.get(c.request, "") if c.request is not None else None
    lines = new_lines(d, log_at)
    naming = [ln for ln in lines if ("WARNING" in ln or "INFO" in ln) and re.search(c.reason, ln)]
    assert len(naming) == 1, f"want one log line matching {c.reason!r}, got:\n" + "\n".join(lines)
    if name:
        assert name in naming[0], naming[0]
        assert sum(name in ln for ln in lines) == 1, "\n".join(lines)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_malformed_request(env, c):
    run_case(env, c)


# --------------------------------------------------- repeated setup releases

def maps_of(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(f"/memfd:{name}" in ln for ln in f)


def test_repeated_set_mem_table_releases_old_mappings_and_fds(env):
    d = env.d
    pid = d.proc.pid
    base_fds = idle_fds(env)
    fe = Frontend.connect(d.socket)
    mems = []
    try:
        prefix_ack(fe)
        fe.set_features(SPLIT_FEATURES, need_reply=True)
        for i in range(6):
            mem = GuestMemory(2 * MB, name=f"hm-table{i}",
                              layout=[(0, MB), (MB, MB)])       # two regions, two fds
            mems.append(mem)
            fe.set_mem_table(mem, need_reply=True)
            assert maps_of(pid, f"hm-table{i}0") == 1 and maps_of(pid, f"hm-table{i}1") == 1
            for j in range(i):
                assert maps_of(pid, f"hm-table{j}0") == 0, f"table {j} still mapped after table {i}"
            # the connection socket + the two region fds of the live table
            assert fd_count(pid) == base_fds + 3
        # a refused table leaves the live one in place
        with pytest.raises(Nack):
            fe.set_mem_table([(0, 4 * MB, UVA, 0, mems[-1].region(0).fd)], need_reply=True)
        assert maps_of(pid, "hm-table50") == 1 and fd_count(pid) == base_fds + 3
    finally:
        fe.close()
        for m in mems:
            m.close()
    wait_until(lambda: fd_count(pid) == base_fds and maps_of(pid, "hm-table5") == 0, "release on disconnect")


def test_repeated_vring_fds_and_owner_release_the_previous(env):
    d = env.d
    pid = d.proc.pid
    base_fds = idle_fds(env)
    fe = Frontend.connect(d.socket)
    mem = GuestMemory(4 * MB)
    try:
        prefix_ack(fe)
        fe.set_features(SPLIT_FEATURES, need_reply=True)
        fe.set_mem_table(mem, need_reply=True)
        live = fd_count(pid)
        for _ in range(5):
            for setter in (fe.set_vring_kick, fe.set_vring_call, fe.set_vring_err):
                for idx in (0, 1):
                    e = eventfd()
                    setter(idx, e, need_reply=True)
                    os.close(e)
            fe.set_owner(need_reply=True)
            assert fd_count(pid) == live + 6, "a replaced kick/call/err fd stayed open"
        for setter in (fe.set_vring_call, fe.set_vring_err):
            setter(0, None, need_reply=True)    # no-fd: releases the previous one
        assert fd_count(pid) == live + 4
        fe.reset_owner()
        wait_until(lambda: fd_count(pid) == base_fds + 1, "RESET_OWNER to release fds and memory")
    finally:
        fe.close()
        mem.close()
    wait_until(lambda: fd_count(pid) == base_fds, "release on disconnect")


def test_reset_owner_leaves_nothing_behind_and_a_new_set_up_carries_traffic(env):
    """RESET_OWNER on a running port with a dirty log: memory and log unmapped, every
    fd it was handed closed, features and ownership gone (a device request is refused
    until SET_OWNER); then a full set-up on the same connection carries traffic."""
    d = env.d
    pid = d.proc.pid
    base_fds = idle_fds(env)
    g = Guest(d.socket, mem=GuestMemory(32 * MB, name="hm-reset-ram"))
    log = memfd(4096)
    try:
        g.setup()
        sock = packet_socket(env.netns, d.tap)
        g.send([frame(1, 200)])
        assert list(collect(sock, 1)) == [1]
        rep = g.fe.set_log_base(log, 4096)
        assert rep.u64() == 0
        e = eventfd()
        g.fe.set_log_fd(e)
        os.close(e)
        assert maps_of(pid, "hm-reset-ram") >= 1 and maps_of(pid, "hm-mem") == 1
        g.fe.reset_owner(need_reply=True)     # REPLY_ACK was negotiated: acked
        # the connection socket is all that is left of this frontend
        wait_until(lambda: fd_count(pid) == base_fds + 1, "RESET_OWNER to close every fd it was handed")
        assert maps_of(pid, "hm-reset-ram") == 0 and maps_of(pid, "hm-mem") == 0, "a mapping stayed"
        port = next(p for p in json.loads(vhostctl(d, "ports", "--json").stdout) if p["name"] == d.tap)
        fe_info = port["frontend"]
        assert fe_info["features"] == 0 and fe_info["protocol_features"] == 0
        assert fe_info["memory_regions"] == 0 and not fe_info["dirty_log"]["log_bytes"]
        assert not any(v["started"] or v["enabled"] for v in fe_info["vrings"])
        # ownership ended with it; the protocol features too, so the refusal is silent
        g.fe.ack_all = False
        g.fe.set_features(SPLIT_FEATURES, need_reply=False)
        assert g.fe.ping()
        assert "SET_FEATURES before SET_OWNER" in d.log()
        g.fe.ack_all = True
        # a full set-up again, same connection, same rings (resumed at their used idx)
        g.setup()
        g.send([frame(2, 200), frame(3, 300)])
        assert sorted(collect(sock, 2)) == [2, 3]
        g.post_rx(2)
        sock.send(frame(7, 300, b"RST"))
        got: list = []
        while not any(marker_of(u.data[HDR:], b"RST") == 7 for u in got):
            got += g.rx.wait_used(1)
        sock.close()
    finally:
        g.close()
        os.close(log)
    wait_until(lambda: fd_count(pid) == base_fds, "release on disconnect")


def test_refused_vring_addr_keeps_the_ring_running(env):
    """A SET_VRING_ADDR refused on a live ring leaves the addresses it had."""
    g = Guest(env.d.socket).setup()
    try:
        sock = packet_socket(env.netns, env.d.tap)
        for bad in (dict(desc=0x1000), dict(used=g.tx.used_uva + 2)):
            with pytest.raises(Nack):
                g.fe.set_vring_addr(1, g.tx, **bad)
            m = secrets.randbelow(1 << 31)
            g.send([frame(m, 100)])
            assert list(collect(sock, 1)) == [m]
        sock.close()
    finally:
        g.close()


# ----------------------------------------------------------------------- the end

def test_zz_other_port_still_works_and_figures(env, capsys):
    """Runs last in this module: port B carries traffic, the daemon never died."""
    assert env.d.alive()
    port_traffic(env)
    # port A itself still serves a well-behaved frontend
    g = Guest(env.d.socket).setup()
    try:
        sock = packet_socket(env.netns, env.d.tap)
        g.send([frame(42, 100)])
        assert list(collect(sock, 1)) == [42]
        sock.close()
    finally:
        g.close()
    assert env.crashes == 0
    assert env.tried == len(CASES), "run the whole module for the figures"
    with capsys.disabled():
        print(f"\n[{env.loop}] malformed requests tried: {env.tried}, distinct checks: {len(env.checks)}, "
              f"daemon crashes: {env.crashes}")
