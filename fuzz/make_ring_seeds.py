"""Seed corpus for fuzz_rings.c: rings laid out by the tests' guest drivers.

The chain shapes are the ones the ring tests post (tests/datapath/test_*.py): header and frame in
one or many descriptors, empty descriptors, indirect tables, mergeable RX
buffer sets, small non-power-of-two packed rings, EVENT_IDX, buffers in a far
region and across two gpa-adjacent regions, plus the hostile chains of the
hardening tests (loops, nested indirect tables, avail idx running ahead,
readable RX buffers, bad vnet headers). Each seed is struct fuzz_cfg followed by
the image of guest memory from gpa 0 up to the last byte the driver wrote.

    .venv/bin/python fuzz/make_ring_seeds.py fuzz/corpus/rings
"""
from __future__ import annotations

import hashlib
import os
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.driver import net_hdr  # noqa: E402
from tests.driver.constants import (  # noqa: E402
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
)
from tests.driver.guestmem import GuestMemory  # noqa: E402
from tests.driver.packed import PackedRing  # noqa: E402
from tests.driver.split import SplitRing  # noqa: E402

# struct fuzz_cfg in fuzz_rings.c
CFG = struct.Struct("<BBHHIIIIIIIIHBB4H")
FZ_PACKED, FZ_EVENT_IDX, FZ_INDIRECT, FZ_MRG, FZ_V1, FZ_CSUM, FZ_HOST_GSO, FZ_GUEST_GSO = (1 << i for i in range(8))
FZ_TX_ENABLED, FZ_RX_ENABLED, FZ_TX_STARTED, FZ_RX_STARTED, FZ_HDR10, FZ_NO_CALL, FZ_REBASE, FZ_RESET = (
    1 << i for i in range(8))
RUNNING = FZ_TX_ENABLED | FZ_RX_ENABLED | FZ_TX_STARTED | FZ_RX_STARTED
FZ_WORKER = 0x80  # cfg.rounds: then through the worker thread
FZ_TRUNCATE = 0x40  # cfg.rounds: R1 shrinks to nothing before the first round (or the worker phase)
FZ_LOG = 0x20  # cfg.rounds: dirty log on
LAYOUT = [(0, 0x10000), (0x10000, 0x10000), (1 << 32, 0x1000)]
IMAGE_MAX = 0x20000
_DESC = struct.Struct("<QIHH")


def eth_frame(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + rnd.randbytes(n - 14)


class Seed:
    """Guest memory + an RX and a TX ring, as fuzz_rings.c will map them."""

    def __init__(self, packed=False, num=8, event_idx=False, indirect=False, buf_region=None, rx_num=None):
        self.mem = GuestMemory(layout=LAYOUT)
        cls = PackedRing if packed else SplitRing
        self.rx = cls(self.mem, rx_num or num, event_idx=event_idx, indirect=indirect, region=0,
                      buf_region=buf_region)
        self.tx = cls(self.mem, num, event_idx=event_idx, indirect=indirect, region=0, buf_region=buf_region)
        self.packed = packed
        self.features = (FZ_PACKED if packed else 0) | (FZ_EVENT_IDX if event_idx else 0) | \
            (FZ_INDIRECT if indirect else 0) | FZ_V1

    def parts(self, ring):
        if self.packed:
            return ring.desc_gpa, ring.driver_gpa, ring.device_gpa
        return ring.desc_gpa, ring.avail_gpa, ring.used_gpa

    def encode(self, features=0, ctl=RUNNING, rounds=1, frames=(), mtu=1500, base=None, worker=False,
               truncate=False, log=False) -> bytes:
        rxp, txp = self.parts(self.rx), self.parts(self.tx)
        if base is None:
            base = 0x8000 if self.packed else 0     # packed: slot 0, wrap counter 1
        lens = (list(frames) + [0, 0, 0, 0])[:4]
        cfg = CFG.pack(self.features | features, ctl, self.rx.num, self.tx.num, base, base,
                       rxp[0], txp[0], rxp[1], txp[1], rxp[2], txp[2], mtu,
                       (rounds - 1) | (FZ_WORKER if worker else 0) | (FZ_TRUNCATE if truncate else 0)
                       | (FZ_LOG if log else 0),
                       len(frames), *lens)
        top = max(r.gpa + r._next for r in self.mem._regions[:2])
        image = self.mem.read(0, min(top, IMAGE_MAX)).rstrip(b"\0")
        self.mem.close()
        return cfg + image


def tx_blob(n=200, seed=1, **hdr):
    return net_hdr(**hdr) + eth_frame(n, seed)


def seeds():
    # TX: one descriptor; RX: one buffer (test_datapath_tx/_rx basics)
    s = Seed(num=8)
    s.tx.add_out([tx_blob()]); s.tx.publish()
    s.rx.add_in([1530]); s.rx.publish()
    yield "split-basic", s.encode(frames=[212])
    s = Seed(num=8)
    s.tx.add_out([tx_blob()]); s.tx.add_out([tx_blob(300, 18)]); s.tx.publish()
    s.rx.add_in([1530]); s.rx.add_in([1530]); s.rx.publish()
    yield "split-worker", s.encode(frames=[212, 300, 1000], worker=True)

    # TX header split over descriptors, an empty one, indirect (test_tx_basic_split_header_and_indirect)
    for packed in (False, True):
        s = Seed(packed=packed, num=8 if not packed else 7, indirect=True)
        b = tx_blob(600, 2)
        s.tx.add_out([b[:3], b[3:7], b[7:13], b[13:300], b"", b[300:]], indirect=False); s.tx.publish()
        s.tx.add_out([b[i:i + 100] for i in range(0, len(b), 100)], indirect=True); s.tx.publish()
        s.rx.add_in([100, 200, 1300], indirect=True); s.rx.publish()
        yield f"{'packed' if packed else 'split'}-chains-indirect", s.encode(frames=[612, 40])

    # Mergeable RX over several chains, EVENT_IDX (test_ring_properties / mrg tests)
    for packed in (False, True):
        s = Seed(packed=packed, num=16 if not packed else 7, event_idx=True, indirect=True)
        for shape in ([64, 64], [128], [256, 256, 512], [1024], [700]):
            s.rx.add_in(shape)
        s.rx.publish()
        s.tx.add_out([tx_blob(100, 3)]); s.tx.add_out([tx_blob(60, 4)]); s.tx.publish()
        yield f"{'packed' if packed else 'split'}-mrg-event-idx", s.encode(
            features=FZ_MRG, frames=[1000, 60, 1514, 12], rounds=2, worker=packed)

    # Small non-power-of-two packed ring over several laps (test_wraparound_laps_small_queue)
    s = Seed(packed=True, num=3)
    s.tx.add_out([tx_blob(80, 5)]); s.tx.add_out([tx_blob(90, 6)]); s.tx.publish()
    s.rx.add_in([400]); s.rx.add_in([400]); s.rx.publish()
    yield "packed-small-rebase", s.encode(ctl=RUNNING | FZ_REBASE, frames=[100, 200], rounds=3)

    # Offloads: a TSO frame with NEEDS_CSUM, a UDP frame without (vr_tx_hdr_ok)
    s = Seed(num=8)
    s.tx.add_out([tx_blob(1400, 7, flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                          csum_offset=16)])
    s.tx.add_out([tx_blob(300, 8, flags=1, csum_start=34, csum_offset=6)])
    s.tx.add_out([tx_blob(300, 9, gso_type=3, gso_size=100, hdr_len=42)])
    s.tx.add_out([tx_blob(1400, 15, flags=1, gso_type=4, hdr_len=74, gso_size=1428, csum_start=54,
                          csum_offset=16)])
    s.tx.add_out([tx_blob(1400, 16, flags=1, gso_type=5, hdr_len=42, gso_size=1000, csum_start=34,
                          csum_offset=6)])
    s.tx.add_out([tx_blob(1400, 17, flags=1, gso_type=0x81, hdr_len=54, gso_size=1448, csum_start=34,
                          csum_offset=16)])
    s.tx.publish()
    s.rx.add_in([2000]); s.rx.publish()
    yield "split-offloads", s.encode(features=FZ_CSUM | FZ_HOST_GSO | FZ_GUEST_GSO, frames=[1500])

    # Buffers in the far region and a buffer crossing the R0/R1 boundary
    s = Seed(num=8, buf_region=2)
    s.tx.add_out([tx_blob(100, 10)]); s.tx.publish()
    s.rx.add_in([600]); s.rx.publish()
    yield "split-far-region", s.encode(frames=[300])
    s = Seed(num=8)
    blob = tx_blob(120, 11)
    s.mem.write(0x10000 - 40, blob)
    s.tx.mem.write(s.tx.desc_gpa, _DESC.pack(0x10000 - 40, len(blob), 0, 0))
    s.tx.push_avail(0); s.tx.publish()
    yield "split-cross-region", s.encode()

    # Disabled but started TX ring drops; legacy 10-byte header; no call fds
    s = Seed(num=4)
    s.tx.add_out([tx_blob(100, 12)[2:]]); s.tx.publish()
    s.rx.add_in([300]); s.rx.publish()
    yield "split-hdr10-disabled", s.encode(ctl=FZ_TX_STARTED | FZ_RX_STARTED | FZ_RX_ENABLED | FZ_HDR10 | FZ_NO_CALL,
                                           frames=[100])
    s = Seed(num=4)
    s.tx.add_out([tx_blob(100, 13)]); s.tx.publish()
    yield "split-reset", s.encode(ctl=RUNNING | FZ_RESET, rounds=2)

    # Hostile chains (the hardening tests): a loop, nested indirect, avail idx far ahead,
    # readable RX buffer, writable TX buffer, bad header
    s = Seed(num=8, indirect=True)
    d = s.tx.desc_gpa
    s.mem.write(d, _DESC.pack(0x3000, 64, VRING_DESC_F_NEXT, 1))
    s.mem.write(d + 16, _DESC.pack(0x3000, 64, VRING_DESC_F_NEXT, 0))
    s.tx.push_avail(0); s.tx.publish()
    yield "split-loop", s.encode()
    s = Seed(num=8, indirect=True)
    table = s.mem.alloc(32, 16, 0)
    s.mem.write(table, _DESC.pack(table, 32, VRING_DESC_F_INDIRECT, 0))
    s.mem.write(s.tx.desc_gpa, _DESC.pack(table, 32, VRING_DESC_F_INDIRECT, 0))
    s.tx.push_avail(0); s.tx.publish()
    yield "split-nested-indirect", s.encode()
    s = Seed(num=8)
    s.tx.add_out([tx_blob()]); s.tx.publish()
    s.mem.write_u16(s.tx.avail_gpa + 2, 9)
    yield "split-avail-ahead", s.encode()
    s = Seed(num=8)
    s.rx.add_chain([b"x" * 20], [600]); s.rx.publish()
    s.tx.add_chain([tx_blob()], [64]); s.tx.publish()
    yield "split-wrong-direction", s.encode(frames=[100])
    s = Seed(packed=True, num=4, indirect=True)
    s.tx.add_out([tx_blob(100, 14, flags=2, gso_type=7)]); s.tx.publish()
    s.rx.add_chain([b"y" * 20], [600]); s.rx.publish()
    yield "packed-bad-header-readable-rx", s.encode(frames=[100])

    # Iovec limits: a TX chain of more than VR_MAX_IOV segments (an indirect table whose
    # buffers each cross the R0/R1 boundary), and mergeable RX chains of many segments
    # that exhaust the RX iovecs before rx_need (GSO-sized) is reached.
    def crossing_table(ring, n, write):
        table = s.mem.alloc(16 * n, 16, 0)
        flag = VRING_DESC_F_WRITE if write else 0
        for i in range(n):
            last = i == n - 1
            s.mem.write(table + 16 * i, _DESC.pack(0x10000 - 8, 16, flag | (0 if last else VRING_DESC_F_NEXT),
                                                   0 if last else i + 1))
        return table

    s = Seed(num=512, indirect=True, rx_num=4)
    head = s.tx.reserve_desc(1)[0]
    s.tx.write_desc(head, crossing_table(s.tx, 512, False), 16 * 512, VRING_DESC_F_INDIRECT)
    s.tx.push_avail(head); s.tx.publish()
    yield "split-tx-too-many-segments", s.encode()
    s = Seed(num=4, indirect=True, rx_num=64)
    for _ in range(40):
        head = s.rx.reserve_desc(1)[0]
        s.rx.write_desc(head, crossing_table(s.rx, 16, True), 16 * 16, VRING_DESC_F_INDIRECT)
        s.rx.push_avail(head)
    s.rx.publish()
    yield "split-rx-mrg-iov-exhausted", s.encode(features=FZ_MRG | FZ_CSUM | FZ_GUEST_GSO,
                                                 frames=[300, 4000, 100, 9000], rounds=2)


    # The frontend shrinks R1 mid-input (tests/datapath/test_faults.py): a mergeable RX
    # gather whose second chain's indirect table is in R1, and a TX burst whose second
    # frame (copied) is in R1 behind a zero-copy one in R0, through the worker (io_uring).
    for packed in (False, True):
        s = Seed(packed=packed, num=8, indirect=True)
        s.rx.add_in([1024], indirect=False)
        s.rx.buf_region = 1
        s.rx.add_in([64, 2048], indirect=True)
        s.rx.publish()
        yield f"{'packed' if packed else 'split'}-truncate-mrg-gather", s.encode(
            features=FZ_MRG, frames=[1000, 1500], rounds=2, truncate=True)
    for worker in (False, True):
        s = Seed(num=8)
        s.tx.add_out([tx_blob(1000, 20)])
        s.tx.buf_region = 1
        s.tx.add_out([tx_blob(100, 21)])
        s.tx.publish()
        yield f"split-truncate-tx-burst{'-worker' if worker else ''}", s.encode(
            rounds=1 if worker else 2, worker=worker, truncate=True)

    # Dirty log on: mergeable RX into buffers in R0, R1 and R2 (beyond the log), TX too.
    for packed in (False, True):
        s = Seed(packed=packed, num=8, event_idx=not packed)
        for region in (0, 1, 2):
            s.rx.buf_region = region
            s.rx.add_in([700])
        s.rx.publish()
        s.tx.add_out([tx_blob(300, 22)]); s.tx.publish()
        yield f"{'packed' if packed else 'split'}-dirty-log", s.encode(
            features=FZ_MRG, frames=[1400, 60], rounds=2, log=True, worker=packed)

    # A packed chain of more than VR_MAX_IOV segments on each ring (one indirect table each)
    s = Seed(packed=True, num=520, indirect=True)
    for ring, flag in ((s.tx, 0), (s.rx, VRING_DESC_F_WRITE)):
        ring.make_indirect([(0x10000 - 8, 16, flag)] * 520)
        ring.publish()
    yield "packed-too-many-segments", s.encode(features=FZ_MRG, frames=[100])


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus" / "rings")
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, data in seeds():
        (out / f"seed-{name}-{hashlib.sha1(data).hexdigest()[:8]}").write_bytes(data)
        n += 1
    print(f"{n} ring seeds in {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
