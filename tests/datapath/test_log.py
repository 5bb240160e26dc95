"""The dirty-page log of live migration, in the C datapath (vhost-user spec
"Migration"; csrc/vr_internal.h "dirty log").

With a log set (vr_qp_set_log) and VHOST_F_LOG_ALL negotiated, the worker must
mark exactly the 4 KiB guest-physical pages it writes: the bytes of RX buffers
(vnet header, num_buffers, payload) and its ring writes (split: used elements,
used idx, flags or avail_event; packed: the descriptors written back and the
device event area). TX buffers are only read. Each test computes the expected
page set from what the guest driver posted and what the device returned, and
compares it with the bitmap, which the test clears after the queue pair settles.
"""
from __future__ import annotations

import pytest

from vhostd._native import ffi, lib

from tests.datapath.harness import (
    F_EVENT_IDX,
    F_INDIRECT,
    F_MRG,
    F_PACKED,
    F_V1,
    NUM,
    Dev,
    eth_frame,
    mrg_frames,
    wait_for,
)
from tests.driver import GuestMemory, net_hdr

F_LOG_ALL = 1 << lib.VR_F_LOG_ALL
PAGE = 4096
M1 = 1 << 20


class Log:
    """A dirty log the test owns: `words` u64 of bitmap, as QEMU sizes it for the
    guest memory (1 bit per 4 KiB page from gpa 0 up)."""

    def __init__(self, words: int):
        self.words = words
        self.buf = ffi.new("uint64_t[]", words)

    @classmethod
    def for_memory(cls, mem: GuestMemory) -> "Log":
        top = max(gpa + size for gpa, size, *_ in mem.regions())
        return cls((top // PAGE + 63) // 64)

    @property
    def addr(self) -> int:
        return int(ffi.cast("uintptr_t", self.buf))

    def install(self, dev: Dev) -> None:
        with dev.paused(settle=True):
            assert lib.vr_qp_set_log(dev.qp, self.addr, self.words) == 0
        # The worker writes into the bitmap until the queue pair is freed, which the
        # make_dev fixture does after the test returns: the buffer lives as long.
        dev.keep.append(self)
        self.clear(dev)

    def clear(self, dev: Dev) -> None:
        with dev.paused():
            for i in range(self.words):
                self.buf[i] = 0

    def pages(self) -> set[int]:
        out = set()
        for w in range(self.words):
            v = self.buf[w]
            while v:
                b = v & -v
                out.add(64 * w + b.bit_length() - 1)
                v ^= b
        return out


def pages_of(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1)) if n else set()


def written_pages(bufs, n: int) -> set[int]:
    """Pages of the first n bytes of a chain's writable buffers [(gpa, len, writable)]."""
    out: set[int] = set()
    for gpa, blen, w in bufs:
        if not w or n <= 0:
            continue
        k = min(blen, n)
        out |= pages_of(gpa, k)
        n -= k
    return out


def split_ring_pages(ring, slots: list[int], event_idx: bool) -> set[int]:
    """Split used ring: the elements written, idx, and the notification field."""
    u = ring.used_gpa
    out = pages_of(u + 2, 2)                                 # idx
    out |= pages_of(u + 4 + 8 * ring.num, 2) if event_idx else pages_of(u, 2)   # avail_event | flags
    for s in slots:
        out |= pages_of(u + 4 + 8 * (s % ring.num), 8)
    return out


def packed_ring_pages(ring, slots: list[int]) -> set[int]:
    """Packed ring: the descriptors written back and the device event area."""
    out = pages_of(ring.device_gpa, 4)
    for s in slots:
        out |= pages_of(ring.desc_gpa + 16 * (s % ring.num), 16)
    return out


def chain_bufs(ring, head: int):
    return list(ring._chains[head].bufs)


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_marks_exactly_buffers_and_ring(make_dev, packed, event_idx):
    """Frames received into buffers spread over two regions (one crossing the
    boundary): the marked pages are the written bytes' pages plus the ring's."""
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, 4 * M1)])
    features = F_V1 | F_LOG_ALL | (F_PACKED if packed else 0) | (F_EVENT_IDX if event_idx else 0)
    dev = make_dev(features=features, mem=mem, ring_region=0)
    log = Log.for_memory(mem)
    log.install(dev)
    heads, bufs = [], {}
    for i in range(6):
        dev.rx.buf_region = i % 2
        h = dev.rx.add_in([2048])
        heads.append(h)
        bufs[h] = chain_bufs(dev.rx, h)
    # a buffer crossing the region boundary (two iovecs, two gpa ranges)
    cross = 4 * M1 - 700
    h = post_writable(dev.rx, cross, 2048)
    bufs[h] = [(cross, 2048, True)]
    dev.rx.publish()
    dev.rx.kick()
    frames = [net_hdr() + eth_frame(n, n) for n in (60, 1000, 1500, 300, 1400, 900, 1514)]
    for f in frames:
        dev.peer.send(f)
    used = dev.rx.wait_used(len(frames))
    assert [u.head for u in used] == heads + [h]
    expect = set()
    for u in used:
        expect |= written_pages(bufs[u.head], u.len)
    slots = list(range(len(used)))
    expect |= packed_ring_pages(dev.rx, slots) if packed else split_ring_pages(dev.rx, slots, event_idx)
    with dev.paused():
        got = log.pages()
        marks = lib.vr_qp_log_marks(dev.qp)
    assert got == expect, f"extra {sorted(got - expect)} missing {sorted(expect - got)}"
    assert pages_of(cross, 700) | pages_of(4 * M1, 1) <= got       # both sides of the boundary
    assert marks >= len(got)


def post_writable(ring, gpa: int, n: int) -> int:
    """Posts (unpublished) one writable buffer at an address the driver did not
    allocate (e.g. across a region boundary), tracked like the driver's own."""
    from tests.driver import packed as packed_mod
    from tests.driver import split as split_mod
    if isinstance(ring, packed_mod.PackedRing):
        bid = ring._free_ids.pop()
        ring.post_raw([(gpa, n, 2)], bid=bid)
        ring._chains[bid] = packed_mod._Chain(1, [(gpa, n, True)], in_capacity=n)
        return bid
    [h] = ring.reserve_desc(1)
    ring.write_desc(h, gpa, n, 2, 0)
    ring.push_avail(h)
    ring._chains[h] = split_mod._Chain([h], [(gpa, n, True)], in_capacity=n)
    return h


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_mergeable_marks_every_chain_of_a_frame(make_dev, packed):
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, 4 * M1)])
    dev = make_dev(features=F_V1 | F_MRG | F_LOG_ALL | (F_PACKED if packed else 0), mem=mem, ring_region=0)
    log = Log.for_memory(mem)
    log.install(dev)
    bufs = {}
    for i in range(12):
        dev.rx.buf_region = i % 2
        h = dev.rx.add_in([600])
        bufs[h] = chain_bufs(dev.rx, h)
    dev.rx.publish()
    dev.rx.kick()
    sizes = (1400, 100, 1500)
    for n in sizes:
        dev.peer.send(net_hdr() + eth_frame(n, n))
    got_frames = mrg_frames(dev.rx, len(sizes))
    assert [nb for nb, _, _ in got_frames] == [3, 1, 3]
    # the used entries come back in the order the chains were posted
    heads = list(bufs)[:7]
    lens = [ln for _, ls, _ in got_frames for ln in ls]
    expect = set()
    for h, ln in zip(heads, lens):
        expect |= written_pages(bufs[h], ln)
    slots = list(range(7))
    expect |= packed_ring_pages(dev.rx, slots) if packed else split_ring_pages(dev.rx, slots, False)
    with dev.paused():
        got = log.pages()
    assert got == expect, f"extra {sorted(got - expect)} missing {sorted(expect - got)}"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_tx_marks_only_ring_writes(make_dev, packed):
    """TX buffers are only read: only the ring's pages are marked, never the buffers'."""
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, 4 * M1)])
    dev = make_dev(features=F_V1 | F_LOG_ALL | F_INDIRECT | (F_PACKED if packed else 0), mem=mem,
                   ring_region=0)
    log = Log.for_memory(mem)
    log.install(dev)
    dev.tx.buf_region = 1
    for i in range(5):
        dev.tx.add_out([net_hdr() + eth_frame(1000 + 100 * i, i)])
    dev.tx.add_out([net_hdr(), eth_frame(200, 9)], indirect=True)
    dev.tx.publish()
    dev.tx.kick()
    for _ in range(6):
        dev.recv_tap()
    used = dev.tx.wait_used(6)
    slots = list(range(len(used)))
    expect = packed_ring_pages(dev.tx, slots) if packed else split_ring_pages(dev.tx, slots, False)
    # The worker's passes also ask the (empty) RX ring for a kick: its notification field.
    rx_notify = pages_of(dev.rx.device_gpa, 4) if packed else pages_of(dev.rx.used_gpa, 2)
    with dev.paused():
        got = log.pages()
    assert expect <= got and got - expect <= rx_notify, \
        f"extra {sorted(got - expect - rx_notify)} missing {sorted(expect - got)}"
    assert not got & pages_of(4 * M1, 4 * M1), "a TX buffer page was marked"


@pytest.mark.parametrize("how", ["no-log-all", "no-log"])
def test_logging_off_marks_nothing(make_dev, how):
    mem = GuestMemory(8 * M1)
    features = F_V1 | (F_LOG_ALL if how == "no-log" else 0)
    dev = make_dev(features=features, mem=mem)
    log = Log.for_memory(mem)
    if how == "no-log-all":
        log.install(dev)                        # a log, but LOG_ALL not negotiated
    dev.rx.add_in([2048])
    dev.rx.publish_and_kick()
    dev.peer.send(net_hdr() + eth_frame(500, 1))
    dev.rx.wait_used(1)
    dev.send([net_hdr() + eth_frame(300, 2)])
    dev.recv_tap()
    dev.tx.wait_used(1)
    with dev.paused():
        assert log.pages() == set()
        assert lib.vr_qp_log_marks(dev.qp) == 0


def test_log_switched_on_and_off_with_the_features(make_dev):
    """SET_FEATURES with and without LOG_ALL (a migration, then a cancelled one):
    marks while it is on, none after."""
    mem = GuestMemory(8 * M1)
    dev = make_dev(features=F_V1, mem=mem)
    log = Log.for_memory(mem)
    log.install(dev)
    for on in (True, False, True):
        with dev.paused():
            assert lib.vr_qp_set_features(dev.qp, F_V1 | (F_LOG_ALL if on else 0), 12) == 0
        log.clear(dev)
        dev.rx.add_in([2048])
        dev.rx.publish_and_kick()
        dev.peer.send(net_hdr() + eth_frame(500, 1))
        dev.rx.wait_used(1)
        with dev.paused():
            assert bool(log.pages()) == on


def test_log_smaller_than_memory_drops_marks_beyond_it(make_dev):
    """A log that covers only the first MiB: marks beyond are counted as dropped,
    nothing is written past the bitmap (ASan checks the bytes after it)."""
    mem = GuestMemory(layout=[(0, 4 * M1), (4 * M1, 4 * M1)])
    dev = make_dev(features=F_V1 | F_LOG_ALL, mem=mem, ring_region=0)
    log = Log(M1 // PAGE // 64)
    log.install(dev)
    dev.rx.buf_region = 1
    dev.rx.add_in([2048])
    dev.rx.publish_and_kick()
    dev.peer.send(net_hdr() + eth_frame(500, 1))
    dev.rx.wait_used(1)
    with dev.paused():
        assert lib.vr_qp_log_overflow(dev.qp) >= 1
        assert all(p < M1 // PAGE for p in log.pages())


def test_split_used_ring_logged_at_log_guest_addr(make_dev):
    """VHOST_VRING_F_LOG: used-ring writes are marked at log_guest_addr (the frontend's
    guest-physical address of the used ring), not at the translated one."""
    mem = GuestMemory(8 * M1)
    dev = make_dev(features=F_V1 | F_LOG_ALL, mem=mem)
    log = Log.for_memory(mem)
    fake_used = 6 * M1                          # where the frontend says the used ring is
    with dev.paused():
        assert lib.vr_qp_set_log_addr(dev.qp, lib.VR_TX, 1, fake_used) == 0
    log.install(dev)
    dev.send([net_hdr() + eth_frame(300, 2)])
    dev.recv_tap()
    dev.tx.wait_used(1)
    with dev.paused():
        got = log.pages() - pages_of(dev.rx.used_gpa, 2)      # the idle RX ring's flags
    assert got == {fake_used // PAGE}
    assert lib.vr_qp_set_log(dev.qp, 8, 0) == -lib_errno("EBUSY")          # paused only
    with dev.paused():
        assert lib.vr_qp_set_log(dev.qp, log.addr, 0) == -lib_errno("EINVAL")    # no words
        assert lib.vr_qp_set_log(dev.qp, log.addr + 4, 1) == -lib_errno("EINVAL")  # misaligned


def lib_errno(name: str) -> int:
    import errno
    return getattr(errno, name)


def test_rx_frame_dropped_after_the_read_still_marks_the_buffers_it_was_read_into(make_dev):
    """A frame larger than the buffers posted is read into them, truncated and
    dropped (drop_ring_full); the chain stays with the device, unused. The bytes
    the kernel copied into it are guest memory written all the same: marked, so
    that the migrated guest's memory equals the source's page for page."""
    mem = GuestMemory(8 * M1)
    dev = make_dev(features=F_V1 | F_LOG_ALL, mem=mem, ring_region=0)
    log = Log.for_memory(mem)
    log.install(dev)
    gpa = 5 * M1 + 4096 - 100                # 600 bytes over two pages
    post_writable(dev.rx, gpa, 600)
    dev.rx.publish()
    dev.rx.kick()
    dev.peer.send(net_hdr() + eth_frame(1400, 1))
    wait_for(lambda: dev.stats(lib.VR_RX)["drop_ring_full"] == 1, what="the drop")
    with dev.paused():
        got = log.pages()
    assert pages_of(gpa, 600) <= got, sorted(got)
    assert dev.rx.get_used() == []
