"""Packet capture of a port (`vhostctl capture`): pcap records out of the
datapath's capture rings (csrc/capture.c), streamed over the control socket.

A capture attaches one ring to each selected queue pair's worker (paused for
the swap only), drains the rings from the event loop every DRAIN_INTERVAL_S,
and turns their records into pcap records (libpcap format, nanosecond time
stamps, link type Ethernet). The daemon writes them to the requesting client
only as fast as it reads them: when the client falls behind (more than
BACKLOG_LIMIT bytes unsent), the rings are not drained, fill up, and the
datapath drops capture records (counted) instead of slowing the guest.

Wire format on the control connection, after the JSON reply line
{"ok": true, "capture": {...}}: blocks of `u32 length (little-endian) +
bytes of the pcap stream`, a zero-length block at the end, then one JSON line
with the totals ({"frames", "dropped"}).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vhostd.errors import SetupError
from vhostd.native import ffi, lib

PCAP_MAGIC_NS = 0xA1B23C4D       # libpcap, nanosecond-resolution time stamps
LINKTYPE_ETHERNET = 1
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")
CAP_RECORD = struct.Struct("=IIIBBHQ")      # struct vr_cap_rec

RING_BYTES = 4 << 20             # per queue pair
DRAIN_INTERVAL_S = 0.02
READ_CHUNK = 1 << 20             # the read buffer
DRAIN_BUDGET = 1 << 20           # record bytes per drain() over all rings, then back to the event loop
BACKLOG_LIMIT = 4 << 20          # bytes queued to a slow client before the rings are left to fill
DIRECTIONS = {"rx": lib.VR_CAP_RX, "tx": lib.VR_CAP_TX, "both": lib.VR_CAP_RX | lib.VR_CAP_TX}
MAX_SNAPLEN = 65535 + 18
MAX_RECORD = (CAP_RECORD.size + MAX_SNAPLEN + 7) & ~7   # the largest record in a ring (8-byte aligned)


def pcap_header(snaplen: int) -> bytes:
    return PCAP_HEADER.pack(PCAP_MAGIC_NS, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


@dataclass
class Capture:
    """The rings of one running capture and its totals."""

    port: str
    queues: list            # device.QueuePair objects it is attached to
    snaplen: int
    count: int              # stop after this many frames (0: until the client goes)
    rings: list = field(default_factory=list)
    frames: int = 0         # pcap records produced
    buf: object = None
    _next: int = 0          # the ring drain() reads first

    @classmethod
    def start(cls, port: str, qps: list, queue: int | None, direction: str, snaplen: int, count: int) -> "Capture":
        """Attaches rings to the selected queue pairs. Raises SetupError."""
        if direction not in DIRECTIONS:
            raise SetupError(f"capture direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not 1 <= snaplen <= MAX_SNAPLEN:
            raise SetupError(f"snap length {snaplen} out of range (1..{MAX_SNAPLEN})")
        if count < 0:
            raise SetupError(f"frame count {count} is negative")
        if queue is not None:
            if not 0 <= queue < len(qps):
                raise SetupError(f"port {port} has no queue pair {queue} (queues: {len(qps)})")
            qps = [qps[queue]]
        cap = cls(port, qps, snaplen, count, buf=ffi.new("uint8_t[]", READ_CHUNK))
        try:
            for qp in qps:
                ring = lib.vr_capture_new(RING_BYTES, snaplen, DIRECTIONS[direction], qp.index)
                if ring == ffi.NULL:
                    raise SetupError(f"cannot allocate a capture ring for queue pair {qp.index}")
                cap.rings.append(ring)
                with qp.paused():
                    lib.vr_qp_set_capture(qp.ptr, ring)
        except BaseException:
            cap.stop()
            raise
        return cap

    def drain(self) -> tuple[bytes, bool]:
        """The pcap records waiting in the rings, in time order (at most `count`
        in all), and whether the rings may hold more.

        Bounded: at most about DRAIN_BUDGET bytes of records per call, over all
        rings. At full packet rate the workers refill their rings as fast as we
        empty them, so "read until empty" would never return and would starve
        the event loop (every other port's control traffic, the watchdog); the
        caller comes back for the rest after the loop has had its turn. The ring
        read first rotates, so one busy queue pair cannot starve the others."""
        recs = []
        used = 0
        n_rings = len(self.rings)
        for k in range(n_rings):
            ring = self.rings[(self._next + k) % n_rings]
            while used < DRAIN_BUDGET:
                # never less than one record of the largest size: a read too small
                # for the next record returns nothing and would stall the ring
                n = lib.vr_capture_read(ring, self.buf, min(READ_CHUNK, max(DRAIN_BUDGET - used, MAX_RECORD)))
                if n <= 0:
                    break
                used += n
                raw = ffi.buffer(self.buf, n)[:]
                pos = 0
                while pos < n:
                    ln, caplen, origlen, _dir, _q, _pad, ts = CAP_RECORD.unpack_from(raw, pos)
                    recs.append((ts, caplen, origlen, raw[pos + CAP_RECORD.size:pos + CAP_RECORD.size + caplen]))
                    pos += ln
        self._next = (self._next + 1) % max(n_rings, 1)
        recs.sort(key=lambda r: r[0])
        if self.count:
            recs = recs[:max(0, self.count - self.frames)]
        self.frames += len(recs)
        return b"".join(PCAP_RECORD.pack(ts // 10**9, ts % 10**9, caplen, origlen) + data
                        for ts, caplen, origlen, data in recs), used >= DRAIN_BUDGET

    @property
    def done(self) -> bool:
        return bool(self.count) and self.frames >= self.count

    @property
    def dropped(self) -> int:
        return sum(lib.vr_capture_drops(r) for r in self.rings)

    def stop(self) -> None:
        """Detaches and frees the rings (workers paused for the swap)."""
        for qp, ring in zip(self.queues, self.rings):
            if qp.ptr is not None:
                try:
                    with qp.paused():
                        lib.vr_qp_set_capture(qp.ptr, ffi.NULL)
                except Exception:       # a stuck worker: the ring stays allocated with it
                    continue
            lib.vr_capture_free(ring)
        self.rings = []
