"""The datapath's fault paths leave nothing behind (csrc/worker.c SIGBUS recovery,
net_rx.c's stash, the io_uring TX burst, qp_control.c's pause).

A frontend may shrink its memory file under the worker (a SIGBUS in the middle
of a burst), make its kick/call/err eventfds blocking and saturate them, or the
worker may not park at all. Each test here drives one such fault through the
real worker thread (tests/datapath/harness.py: one queue pair over memfd guest
memory, a socketpair standing in for the TAP), and then checks what a *second*
frontend on the same queue pair sees, since the daemon keeps one queue pair per
port across frontends: its traffic must be exact, with no frame, used entry or
write left over from the first one.

Guest memory is two memfd regions: region 0 holds the rings (and whatever must
stay readable), region 1 is what the hostile frontend truncates. Python never
touches region 1 after the truncation (that would fault this process).
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from vhostd._native import ffi, lib

from tests.datapath.harness import (
    F_EVENT_IDX,
    F_INDIRECT,
    F_MRG,
    F_PACKED,
    F_V1,
    NUM,
    eth_frame,
    wait_for,
)
from tests.driver import GuestMemory, SplitRing, net_hdr, parse_net_hdr

M1 = 1 << 20
VRING_DESC_F_WRITE = 2


def two_regions() -> GuestMemory:
    """Region 0 (4 MiB, rings and good buffers) and region 1 (1 MiB, the one a
    hostile frontend truncates), adjacent in guest-physical space, two memfds."""
    return GuestMemory(layout=[(0, 4 * M1), (4 * M1, M1)])


def truncate_region(mem: GuestMemory, i: int) -> None:
    os.ftruncate(mem.region(i).fd, 0)


def wait_broken(dev, w: int, why: int) -> dict:
    s = wait_for(lambda: (st := dev.stats(w))["broken"] and st, what=f"vq {w} to break")
    assert s["broken"] == why, s
    return s


def inflight(dev) -> int:
    with dev.paused():
        return lib.vr_qp_inflight(dev.qp)


def rx_exact_after_reconnect(dev, features: int) -> None:
    """Second frontend: one RX chain, one frame: exactly one used entry, for that
    chain, holding the frame; nothing else, no drops. The frame is already
    waiting in the TAP when the frontend comes (as host traffic does), so the
    worker's first pass over the new rings reads it at once."""
    frame = net_hdr() + eth_frame(1000, 77)
    dev.peer.send(frame)
    dev.reconnect(two_regions(), ring_region=0)
    # Head ids other than the first frontend's, so a used entry for one of its
    # chains cannot pass for this one.
    if features & F_PACKED:
        del dev.rx._free_ids[-7:]
    else:
        dev.rx.reserve_desc(7)
    head = dev.rx.add_chain(in_sizes=[4096])
    dev.rx.publish()
    dev.rx.kick()
    [u] = dev.rx.wait_used(1)
    assert u.head == head
    assert u.len == len(frame)
    assert u.data[12:] == frame[12:] and parse_net_hdr(u.data[:12]).num_buffers == 1
    time.sleep(0.2)
    assert dev.rx.get_used() == [], "a used entry for a chain this frontend never posted"
    s = dev.stats(lib.VR_RX)
    assert s["packets"] == 1 and s["drop_ring_full"] == 0 and not s["broken"], s
    assert inflight(dev) == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sigbus_in_mergeable_rx_gather(make_dev, packed):
    """The gather has stashed chain A (region 0) when chain B's indirect table, in
    the truncated region 1, faults: the stash must not survive into the next
    frontend, whose frames would otherwise be read into A's old buffers."""
    features = F_V1 | F_MRG | F_INDIRECT | (F_PACKED if packed else 0)
    mem = two_regions()
    dev = make_dev(features=features, mem=mem, ring_region=0)
    dev.rx.add_chain(in_sizes=[1024])           # less than one frame needs: the gather goes on
    table_buf = mem.alloc(2048, 64, 0)
    dev.rx.buf_region = 1                       # the indirect table lands in region 1
    if packed:
        dev.rx.make_indirect([(table_buf, 2048, VRING_DESC_F_WRITE)])
    else:
        dev.rx.make_indirect([(table_buf, 2048, VRING_DESC_F_WRITE, 0)])
    truncate_region(mem, 1)
    dev.rx.publish()
    dev.rx.kick()
    wait_broken(dev, lib.VR_RX, lib.VR_BROKEN_MEMORY)
    assert inflight(dev) == 0, "RX chains still stashed after the fault"
    rx_exact_after_reconnect(dev, features)


def test_sigbus_in_rx_push(make_dev):
    """The frame is read into the chain and the used ring (region 1) faults in
    push(): the chain must not stay stashed for the next frontend."""
    features = F_V1 | F_MRG | F_EVENT_IDX       # EVENT_IDX: nothing but push writes the used ring

    def rings(mem, which):
        if which == lib.VR_TX:
            return SplitRing(mem, NUM, event_idx=True, region=0)
        return SplitRing(mem, NUM, event_idx=True,
                         desc_gpa=mem.alloc(16 * NUM, 16, 0), avail_gpa=mem.alloc(6 + 2 * NUM, 2, 0),
                         used_gpa=mem.alloc(6 + 8 * NUM, 4, 1))
    mem = two_regions()
    dev = make_dev(features=features, mem=mem, rings=rings)
    dev.rx.add_chain(in_sizes=[4096])
    dev.rx.publish()
    dev.rx.kick()
    time.sleep(0.05)                            # the worker has seen the buffer
    truncate_region(mem, 1)
    dev.peer.send(net_hdr() + eth_frame(600, 5))
    wait_broken(dev, lib.VR_RX, lib.VR_BROKEN_MEMORY)
    assert inflight(dev) == 0, "the RX chain is still stashed after the fault"
    rx_exact_after_reconnect(dev, features)


def test_sigbus_in_io_uring_tx_burst(make_dev):
    """Chain 1 (region 0, > the copy threshold: a writev of guest memory) is
    prepared for io_uring when chain 2's buffer (region 1) faults: chain 1's
    request must be withdrawn, not submitted with the next frontend's burst."""
    mem = two_regions()
    dev = make_dev(features=F_V1, mem=mem, ring_region=0)
    assert lib.vr_qp_io_mode(dev.qp) == lib.VR_IO_URING, "io_uring unavailable: the burst path is not tested"
    dev.tx.add_chain(out=[net_hdr() + eth_frame(1000, 1)])
    dev.tx.buf_region = 1
    dev.tx.add_chain(out=[net_hdr() + eth_frame(100, 2)])      # copied: the copy faults
    truncate_region(mem, 1)
    dev.tx.publish()
    dev.tx.kick()
    wait_broken(dev, lib.VR_TX, lib.VR_BROKEN_MEMORY)
    assert inflight(dev) == 0, "io_uring requests still queued after the fault"
    assert dev.tap_empty(0.1), "a frame of the broken burst reached the TAP"

    dev.reconnect(two_regions(), ring_region=0)
    frame = net_hdr() + eth_frame(1200, 9)
    dev.send([frame])
    assert dev.recv_tap() == frame
    assert dev.tap_empty(0.3), "a stale request from the first frontend was submitted"
    s = dev.stats(lib.VR_TX)
    assert s["packets"] == 1 and s["drop_tap_error"] == 0 and not s["broken"], s
    assert inflight(dev) == 0


def test_new_base_and_reset_drop_inflight_work(make_dev):
    """SET_VRING_BASE and a vq reset start the ring over: whatever a fault left
    in flight is gone before the worker runs again (checked on a stash left by a
    fault, then on a clean queue pair)."""
    mem = two_regions()
    dev = make_dev(features=F_V1 | F_MRG | F_INDIRECT, mem=mem, ring_region=0)
    dev.rx.add_chain(in_sizes=[1024])
    dev.rx.buf_region = 1
    dev.rx.make_indirect([(mem.alloc(2048, 64, 0), 2048, VRING_DESC_F_WRITE, 0)])
    truncate_region(mem, 1)
    dev.rx.publish()
    dev.rx.kick()
    wait_broken(dev, lib.VR_RX, lib.VR_BROKEN_MEMORY)
    with dev.paused():
        assert lib.vr_qp_set_base(dev.qp, lib.VR_RX, 0) == 0
        assert lib.vr_qp_inflight(dev.qp) == 0
        assert lib.vr_qp_reset_vq(dev.qp, lib.VR_TX) == 0
        assert lib.vr_qp_inflight(dev.qp) == 0


# --------------------------------------------------------- blocking eventfds

EFD_MAX = 0xFFFF_FFFF_FFFF_FFFE     # an eventfd counter cannot go higher: a write of 1 blocks


def pause_in_thread(dev, timeout: float = 15.0) -> tuple[bool, int | None]:
    """vr_qp_pause on another thread: (returned in time, its result)."""
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(lib.vr_qp_pause(dev.qp)), daemon=True)
    t.start()
    t.join(timeout)
    return (not t.is_alive(), out[0] if out else None)


def test_blocking_saturated_call_fd_cannot_hold_the_worker(make_dev):
    """The frontend clears O_NONBLOCK on the shared call eventfd and fills its
    counter: the worker's call write would sleep for ever, and every later pause
    with it. The pause nudges the worker out, the TX vq stops (logged once as a
    notification fault) and RX keeps working."""
    dev = make_dev()
    fd = dev.call_fd[lib.VR_TX]
    os.set_blocking(fd, True)
    os.eventfd_write(fd, EFD_MAX)
    frame = net_hdr() + eth_frame(300, 3)
    dev.send([frame])
    assert dev.recv_tap() == frame
    time.sleep(0.1)                             # the worker now sleeps in its call write
    returned, rc = pause_in_thread(dev)
    if not returned:
        os.eventfd_read(fd)                     # unblock the worker so the test can end
        pytest.fail("vr_qp_pause did not return: a blocking call eventfd holds the worker")
    assert rc == 0
    assert lib.vr_qp_resume(dev.qp) == 0
    s = dev.stats(lib.VR_TX)
    assert s["broken"] == lib.VR_BROKEN_NOTIFY and s["broken_detail"] == lib.VR_NOTIFY_CALL, s
    # the other vq of the pair is unaffected
    os.set_blocking(fd, False)
    dev.rx.add_chain(in_sizes=[2048])
    dev.rx.publish()
    dev.rx.kick()
    dev.peer.send(net_hdr() + eth_frame(400, 4))
    [u] = dev.rx.wait_used(1)
    assert u.len == 12 + 400


def test_blocking_saturated_err_fd_cannot_hold_the_worker(make_dev):
    """Same with the err eventfd, which the worker writes when a vq breaks."""
    dev = make_dev()
    fd = dev.err_fd[lib.VR_TX]
    os.set_blocking(fd, True)
    os.eventfd_write(fd, EFD_MAX)
    dev.tx.set_avail_idx(NUM + 5)               # avail idx too far ahead: the vq breaks
    dev.tx.kick()
    time.sleep(0.1)
    returned, rc = pause_in_thread(dev)
    if not returned:
        os.eventfd_read(fd)
        pytest.fail("vr_qp_pause did not return: a blocking err eventfd holds the worker")
    assert rc == 0
    assert lib.vr_qp_resume(dev.qp) == 0
    assert dev.stats(lib.VR_TX)["broken"] == lib.VR_BROKEN_AVAIL_IDX


def test_worker_that_will_not_park(make_dev):
    """A worker that does not come back (here: told to spin, deaf to nudges) makes
    the pause fail after the pause timeout instead of hanging the caller, every
    later pause fail at once, and free refuse until it has parked; then it
    parks for good and frees normally."""
    dev = make_dev()
    lib.vr_set_pause_timeout(300)
    try:
        assert lib.vr_qp_test_stall(dev.qp, 2500) == 0
        dev.tx.kick()                           # wakes the worker into its stall
        time.sleep(0.2)
        t0 = time.monotonic()
        assert lib.vr_qp_pause(dev.qp) == -lib_errno("ETIMEDOUT")
        waited = time.monotonic() - t0
        assert lib.vr_qp_pause(dev.qp) == -lib_errno("ETIMEDOUT")    # stuck: at once
        assert lib.vr_qp_free(dev.qp) == -lib_errno("EBUSY")
        assert lib.vr_qp_parked(dev.qp) == 0
        wait_for(lambda: lib.vr_qp_parked(dev.qp) == 1, timeout=10, what="the stalled worker to park")
        print(f"\npause gave up after {waited * 1000:.0f} ms (timeout 300 ms)")
        assert lib.vr_qp_free(dev.qp) == 0
        dev.qp = ffi.NULL
    finally:
        lib.vr_set_pause_timeout(5000)


def lib_errno(name: str) -> int:
    import errno
    return getattr(errno, name)
