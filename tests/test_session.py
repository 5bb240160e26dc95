"""session.py, the meaning of each request, against a fake device: no root, no
daemon, no C worker. The integration tests (daemon/test_daemon.py, daemon/test_hostile_messages.py)
run the same rules through a real vhostd process.

Covered: feature negotiation (offers, dependencies, rings enabled without
PROTOCOL_FEATURES), the ring-state rules (queue sizes, alignment, bases, enable,
start and stop, `mapped` as the device reports it), the order of an fd
replacement (the device stops watching the old fd before it is closed), refused
requests, the split-ring resync, and what a stuck worker leaves to the device.
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct

import pytest

from vhostd.dispatch import dispatch
from vhostd.errors import RequestError, WorkerStuck
from vhostd.fds import OwnedFd
from vhostd.protocol import (
    F_PROTOCOL_FEATURES,
    Header,
    MemRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    bit,
    pack_u64,
)
from vhostd.session import MAX_QUEUE_SIZE, Session
from vhostd.virtio_net import (
    F_CSUM,
    F_HOST_TSO4,
    F_RING_PACKED,
    F_VERSION_1,
    OFFERED_PROTOCOL_FEATURES,
    offered_features,
)

MEM_END = 1 << 30  # the fake memory table covers frontend addresses [0, MEM_END)
ADDR = VringAddr(0, 0, desc=0x1000, used=0x3000, avail=0x2000, log=0)


class FakeMemory:
    def __init__(self):
        self.regions: list = []
        self.used_idx: dict[int, int] = {}  # used ring uva -> le16 idx, for pread

    def __len__(self):
        return len(self.regions)

    @property
    def total_size(self):
        return sum(r.size for r in self.regions)

    def prepare(self, regions, fds):
        return list(regions)

    def pread(self, uva, n):
        idx = self.used_idx.get(uva - 2)
        return None if idx is None else struct.pack("<H", idx)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class FakeDevice:
    """What Session asks of device.NetDevice. `log` records each call in order;
    apply() records the vring as pushed: ("apply", index, started, enabled, base,
    (kick, call, err) fd numbers, whether the fds of the previous push were still
    open: the datapath must stop watching an fd before it is closed)."""

    def __init__(self, queue_pairs=1):
        self.queue_pairs = queue_pairs
        self.features = offered_features(queue_pairs)
        self.protocol_features = OFFERED_PROTOCOL_FEATURES
        self.mem = FakeMemory()
        self.mtu = 1500
        self.log: list[tuple] = []
        self.held: list[OwnedFd] = []
        self.stuck = False
        self._pushed: dict[int, tuple] = {}

    def _maps(self, v) -> bool:
        return bool(v.configured and self.mem.regions and v.addr.used < MEM_END)

    def set_features(self, acked):
        self.log.append(("set_features", acked))
        return [False] * 2 * self.queue_pairs

    async def change_mtu(self, mtu):
        self.log.append(("change_mtu", mtu))
        self.mtu = mtu

    def install_memory(self, mapped):
        self.mem.regions = mapped
        self.log.append(("install_memory", len(mapped)))
        return [True] * 2 * self.queue_pairs

    def apply(self, vring, base=None):
        fds = tuple(f.fd if f else None for f in (vring.kick, vring.call, vring.err))
        before_open = all(is_open(n) for n in self._pushed.get(vring.index, ()) if n is not None)
        self._pushed[vring.index] = fds
        self.log.append(("apply", vring.index, vring.started, vring.enabled, base, fds, before_open))
        return self._maps(vring)

    saved = None  # no packed-ring restart state (saved_rings)

    def stop_vring(self, vring):
        self.log.append(("stop", vring.index))
        return 0x1234

    def reset(self, keep_memory=False):
        self.log.append(("reset",))
        if self.stuck:
            raise WorkerStuck("queue pair 0: the worker did not stop when asked (stuck)")
        return {i: 0x100 + i for i in range(2 * self.queue_pairs)}

    def hold(self, fds):
        self.held.extend(fds)


class FakeConn:
    closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def session():
    s = Session(FakeDevice(), FakeConn(), logging.LoggerAdapter(logging.getLogger("test"), {}))
    yield s
    s.close()


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))


def with_memory(s: Session) -> None:
    s.set_mem_table([MemRegion(0, MEM_END, 0, 0)], [eventfd()])


def applied(s: Session) -> list[tuple]:
    return [e for e in s.device.log if e[0] == "apply"]


# --- features -----------------------------------------------------------------------


def test_get_features_offers_the_devices(session):
    assert session.get_features() == pack_u64(session.device.features)
    assert session.get_protocol_features() == pack_u64(OFFERED_PROTOCOL_FEATURES)
    assert session.get_queue_num() == pack_u64(1)


def test_features_not_offered_are_refused(session):
    with pytest.raises(RequestError, match="not offered"):
        session.set_features(bit(63))
    with pytest.raises(RequestError, match="not offered"):
        session.set_protocol_features(bit(ProtocolFeature.CONFIG))
    assert session.features == 0 and session.device.log == []


def test_broken_dependencies_are_served_and_logged_once(session, caplog):
    # A real guest acks such sets under some virtio-net-pci properties: served,
    # the unusable offloads logged once per connection.
    caplog.set_level("WARNING")
    session.set_features(bit(F_VERSION_1) | bit(F_HOST_TSO4))
    assert ("set_features", bit(F_VERSION_1) | bit(F_HOST_TSO4)) in session.device.log
    session.set_features(bit(F_VERSION_1) | bit(F_HOST_TSO4))
    warned = [r for r in caplog.records if "offloads ignored" in r.getMessage()]
    assert len(warned) == 1 and "HOST_TSO4 without CSUM" in warned[0].getMessage()
    session.set_features(bit(F_VERSION_1) | bit(F_HOST_TSO4) | bit(F_CSUM))
    assert ("set_features", session.features) in session.device.log


def test_without_protocol_features_rings_start_enabled(session):
    session.set_features(bit(F_VERSION_1))
    assert all(v.enabled for v in session.vrings)
    assert [e[1] for e in applied(session)] == [0, 1]


def test_with_protocol_features_rings_start_disabled(session):
    session.set_features(bit(F_VERSION_1) | bit(F_PROTOCOL_FEATURES))
    assert not any(v.enabled for v in session.vrings) and applied(session) == []
    session.set_protocol_features(bit(ProtocolFeature.REPLY_ACK))
    assert session.protocol_acked(ProtocolFeature.REPLY_ACK)
    assert not session.protocol_acked(ProtocolFeature.MQ)


# --- ring state -----------------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 3, 96, MAX_QUEUE_SIZE * 2])
def test_split_ring_size_must_be_a_power_of_two(session, num):
    with pytest.raises(RequestError, match="power of 2"):
        session.set_vring_num(VringState(0, num))


def test_packed_ring_size_may_be_any_up_to_the_limit(session):
    session.set_features(bit(F_VERSION_1) | bit(F_RING_PACKED) | bit(F_PROTOCOL_FEATURES))
    session.set_vring_num(VringState(1, 96))
    session.set_vring_num(VringState(0, MAX_QUEUE_SIZE))
    assert (session.vrings[0].num, session.vrings[1].num) == (MAX_QUEUE_SIZE, 96)
    with pytest.raises(RequestError, match="packed"):
        session.set_vring_num(VringState(0, MAX_QUEUE_SIZE + 1))


def test_ring_addresses_must_be_aligned(session):
    with pytest.raises(RequestError, match="used address 0x3002 not 4-byte aligned"):
        session.set_vring_addr(VringAddr(0, 0, 0x1000, 0x3002, 0x2000, 0))
    with pytest.raises(RequestError, match="address flags"):
        session.set_vring_addr(VringAddr(0, 2, 0x1000, 0x3000, 0x2000, 0))
    assert session.vrings[0].addr is None


def test_addresses_outside_memory_are_refused_and_the_old_ones_kept(session):
    with_memory(session)
    session.set_vring_num(VringState(0, 256))
    session.set_vring_addr(ADDR)
    assert session.vrings[0].mapped
    outside = VringAddr(0, 0, MEM_END, MEM_END + 0x2000, MEM_END + 0x1000, 0)
    with pytest.raises(RequestError, match="not inside guest memory"):
        session.set_vring_addr(outside)
    assert session.vrings[0].addr == ADDR and session.vrings[0].mapped


def test_mapped_is_what_the_device_reports(session):
    session.set_vring_num(VringState(0, 256))
    session.set_vring_addr(ADDR)
    assert not session.vrings[0].mapped  # no memory table yet
    with_memory(session)
    assert all(v.mapped for v in session.vrings)  # install_memory's answer


def test_split_base_must_fit_16_bits(session):
    with pytest.raises(RequestError, match="out of range for a split ring"):
        session.set_vring_base(VringState(0, 0x10000))
    session.set_vring_base(VringState(0, 0xFFFF))
    assert applied(session)[-1][4] == 0xFFFF


def test_packed_base_slot_must_be_inside_the_ring(session):
    session.set_features(bit(F_VERSION_1) | bit(F_RING_PACKED) | bit(F_PROTOCOL_FEATURES))
    session.set_vring_num(VringState(0, 96))
    with pytest.raises(RequestError, match="slot beyond size"):
        session.set_vring_base(VringState(0, 96))
    with pytest.raises(RequestError, match="slot beyond size"):
        session.set_vring_base(VringState(0, 0x8000 | (100 << 16)))
    session.set_vring_base(VringState(0, 0x8000 | 95))


def test_enable_takes_0_or_1(session):
    with pytest.raises(RequestError, match="enable value 0x2"):
        session.set_vring_enable(VringState(0, 2))
    session.set_vring_enable(VringState(0, 1))
    assert session.vrings[0].enabled and applied(session)[-1][3] is True
    session.set_vring_enable(VringState(0, 0))
    assert not session.vrings[0].enabled


def test_kick_starts_and_get_vring_base_stops(session):
    session.set_vring_kick(0, eventfd())
    assert session.vrings[0].started and applied(session)[-1][2] is True
    reply = session.get_vring_base(VringState(0, 0))
    assert reply == VringState(0, 0x1234).pack()
    assert not session.vrings[0].started and ("stop", 0) in session.device.log


def test_polling_mode_is_refused(session):
    with pytest.raises(RequestError, match="polling mode"):
        session.set_vring_kick(0, None)
    assert not session.vrings[0].started


def test_call_fd_must_be_an_eventfd(session):
    r, w = os.pipe()
    os.close(w)
    pipe = OwnedFd(r)
    with pytest.raises(RequestError, match="not an eventfd"):
        session.set_vring_call(0, pipe)
    assert session.vrings[0].call is None
    pipe.close()


# --- fd replacement ------------------------------------------------------------------


def test_replaced_fd_is_closed_only_after_the_device_stopped_watching_it(session):
    first, second = eventfd(), eventfd()
    old_number = first.fd
    session.set_vring_call(0, first)
    session.set_vring_call(0, second)
    # the second push names the new fd, and the old one was still open then ...
    push = applied(session)[-1]
    assert push[5][1] == second.fd and push[6] is True
    assert session.vrings[0].call is second
    # ... it is closed after it
    assert first.fd == -1 and not is_open(old_number)


def test_no_fd_flag_releases_the_fd(session):
    fd = eventfd()
    session.set_vring_err(1, fd)
    session.set_vring_err(1, None)
    assert session.vrings[1].err is None and fd.fd == -1


def test_vring_file_through_dispatch(session):
    """dispatch hands the handler (index, fd): SET_VRING_CALL with an fd, then with
    the no-fd flag, on vring 1; an index beyond the queue pairs is refused."""
    fd = eventfd()
    session.set_owner()

    def request(raw, fds):
        header = Header(Request.SET_VRING_CALL, 0x1, 8)
        return asyncio.run(dispatch(session, header, pack_u64(raw), fds))

    request(1, [fd])
    assert session.vrings[1].call is fd
    request(0x101, [])
    assert session.vrings[1].call is None and fd.fd == -1
    request(2, [eventfd()])
    assert session.errors == 1


# --- refused requests -----------------------------------------------------------------


def test_net_set_mtu_needs_the_protocol_feature_and_a_sane_value(session):
    with pytest.raises(RequestError, match="without the NET_MTU protocol feature"):
        asyncio.run(session.net_set_mtu(9000))
    session.set_protocol_features(bit(ProtocolFeature.NET_MTU))
    with pytest.raises(RequestError, match="out of range"):
        asyncio.run(session.net_set_mtu(67))
    asyncio.run(session.net_set_mtu(9000))
    assert session.device.log[-1] == ("change_mtu", 9000)


def test_status_fits_8_bits(session):
    with pytest.raises(RequestError, match="does not fit in 8 bits"):
        session.set_status(0x100)
    session.set_status(0xF)
    assert session.get_status() == pack_u64(0xF)


def test_memory_table_needs_one_fd_per_region(session):
    with pytest.raises(RequestError, match="2 memory regions but 1 fds"):
        session.set_mem_table([MemRegion(0, 0x1000, 0, 0), MemRegion(0x1000, 0x1000, 0x1000, 0)], [eventfd()])
    assert len(session.device.mem) == 0


# --- resync, reset, a stuck worker ------------------------------------------------------


def test_split_ring_resyncs_to_used_idx_once_per_base(session):
    with_memory(session)
    session.set_vring_num(VringState(1, 256))
    session.set_vring_addr(VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0))
    session.device.mem.used_idx[0x3000] = 3
    session.set_vring_base(VringState(1, 5))
    session.set_vring_kick(1, eventfd())
    assert session.vrings[1].base == 3 and applied(session)[-1][4] == 3
    session.set_vring_enable(VringState(1, 1))  # already resynced: the base stays
    assert applied(session)[-1][4] is None


def test_reset_owner_forgets_the_frontend(session):
    session.set_owner()
    session.set_protocol_features(bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.LOG_SHMFD))
    session.set_features(bit(F_VERSION_1))
    session.set_status(0xF)
    fds = [eventfd() for _ in range(4)]
    session.set_vring_kick(0, fds[0])
    session.set_vring_call(0, fds[1])
    session.set_vring_err(1, fds[2])
    session.set_log_fd(b"", [fds[3]])
    session.set_vring_base(VringState(1, 5))
    session.reset_owner()
    assert session.features == 0 and session.protocol_features == 0 and session.status == 0
    assert not session.owner and session.log_fd is None and not session._resync_pending
    assert all(f.fd == -1 for f in fds), "a kick/call/err/log fd stayed open"
    assert not any(v.started or v.enabled or v.kick or v.call or v.err or v.num or v.addr for v in session.vrings)
    # memory and the dirty log go with it (device.reset without keep_memory)
    assert session.device.log[-1] == ("reset",)


def test_offloads_ignored_are_logged_again_after_each_kind_of_reset(session, caplog):
    broken = bit(F_VERSION_1) | bit(F_HOST_TSO4)  # TSO without checksum offload
    session.set_owner()
    session.set_protocol_features(bit(ProtocolFeature.RESET_DEVICE))
    for reset in (lambda: None, lambda: session.set_status(0), session.reset_device, session.reset_owner):
        session.set_status(0xF)
        reset()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            session.set_features(broken)
            session.set_features(broken)
        assert caplog.text.count("offloads ignored") == 1  # once per device life
        if not session.owner:
            session.set_owner()
            session.set_protocol_features(bit(ProtocolFeature.RESET_DEVICE))


# --- ownership, through dispatch ---------------------------------------------------------

from vhostd.dispatch import REQUEST_TABLE  # noqa: E402

_PAYLOADS = {  # a well-formed payload per owner-requiring request: only the owner is missing
    Request.SET_MEM_TABLE: struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, 1 << 20, 0, 0),
    Request.SET_LOG_BASE: struct.pack("=QQ", 4096, 0),
    Request.SET_VRING_ADDR: struct.pack("=IIQQQQ", 0, 0, 0x1000, 0x3000, 0x2000, 0),
    Request.ADD_MEM_REG: bytes(8) + struct.pack("=QQQQ", 0, 1 << 20, 0, 0),
    Request.REM_MEM_REG: bytes(8) + struct.pack("=QQQQ", 0, 1 << 20, 0, 0),
    Request.RESET_DEVICE: b"",
    Request.SET_LOG_FD: b"",
    Request.SEND_RARP: bytes.fromhex("525400000001") + bytes(2),
}
OWNED = sorted((r for r, row in REQUEST_TABLE.items() if row.owner), key=int)


def _send(session, req, payload=b"", fds=(), flags=0x9):
    return asyncio.run(dispatch(session, Header(req, flags, len(payload)), payload, list(fds)))


def test_the_requests_that_need_an_owner():
    """Everything that acts on the device; nothing QEMU, DPDK or rust-vmm send before SET_OWNER."""
    assert set(OWNED) == {
        Request.SET_FEATURES, Request.SET_MEM_TABLE, Request.SET_LOG_BASE, Request.SET_LOG_FD,
        Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
        Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_VRING_ENABLE,
        Request.SEND_RARP, Request.NET_SET_MTU, Request.RESET_DEVICE, Request.ADD_MEM_REG,
        Request.REM_MEM_REG, Request.SET_STATUS}


@pytest.mark.parametrize("req", OWNED, ids=lambda r: r.name)
def test_owner_requests_refused_before_set_owner(session, req, caplog):
    session.set_protocol_features(OFFERED_PROTOCOL_FEATURES)  # REPLY_ACK: the refusal is a NACK
    state = REQUEST_TABLE[req].parse is VringState.unpack
    payload = _PAYLOADS.get(req, struct.pack("=II", 0, 1) if state else pack_u64(0))
    fd = eventfd()
    fds = [fd] if REQUEST_TABLE[req].fds[1] else []
    before = list(session.device.log)
    with caplog.at_level(logging.WARNING):
        reply = _send(session, req, payload, fds)
    always = REQUEST_TABLE[req].reply.value == "always"
    assert reply[12:] == (b"" if always else pack_u64(1))
    assert session.errors == 1 and f"{req.name} before SET_OWNER" in caplog.text
    assert session.device.log == before, "the device was touched"
    assert fds == [] or fd.fd == -1 or not is_open(fd.fd), "the refused request's fd stayed open"
    fd.close()


QEMU_PRE_OWNER = [(Request.GET_FEATURES, b""), (Request.GET_PROTOCOL_FEATURES, b""),
                  (Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES)),
                  (Request.GET_QUEUE_NUM, b""), (Request.GET_MAX_MEM_SLOTS, b""), (Request.GET_STATUS, b"")]
DPDK_PRE_OWNER: list = []  # DPDK's virtio-user (and rust-vmm's frontends) send SET_OWNER first


@pytest.mark.parametrize("pre", [QEMU_PRE_OWNER, DPDK_PRE_OWNER], ids=["qemu", "dpdk"])
def test_real_frontends_sequences_are_served(session, pre):
    for req, payload in pre:
        reply = _send(session, req, payload)
        assert reply is None or len(reply) > 12 or req is Request.SET_PROTOCOL_FEATURES, req.name
    assert session.errors == 0
    for req, payload in [(Request.SET_OWNER, b""), (Request.GET_FEATURES, b""),
                         (Request.SET_FEATURES, pack_u64(bit(F_VERSION_1) | bit(F_PROTOCOL_FEATURES))),
                         (Request.SET_VRING_NUM, struct.pack("=II", 0, 256)),
                         (Request.SET_VRING_ADDR, _PAYLOADS[Request.SET_VRING_ADDR])]:
        _send(session, req, payload)
    assert session.errors == 0 and session.owner and session.vrings[0].num == 256


def test_reset_owner_then_a_new_set_up(session):
    """RESET_OWNER (acked: the frontend negotiated REPLY_ACK before it) ends the
    ownership; the next set-up needs SET_OWNER again and then works."""
    _send(session, Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
    _send(session, Request.SET_OWNER)
    _send(session, Request.SET_FEATURES, pack_u64(bit(F_VERSION_1)))
    assert _send(session, Request.RESET_OWNER)[12:] == pack_u64(0)
    assert _send(session, Request.SET_FEATURES, pack_u64(bit(F_VERSION_1))) is None  # no REPLY_ACK any more
    assert session.errors == 1 and session.features == 0
    _send(session, Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
    assert _send(session, Request.SET_OWNER)[12:] == pack_u64(0)
    assert _send(session, Request.SET_FEATURES, pack_u64(bit(F_VERSION_1)))[12:] == pack_u64(0)
    assert session.features == bit(F_VERSION_1) and session.errors == 1


@pytest.mark.parametrize("how", ["status", "reset_device"])
def test_device_reset_stops_rings_clears_features_keeps_owner_and_memory(session, how):
    session.set_owner()
    session.set_protocol_features(bit(ProtocolFeature.RESET_DEVICE))
    session.set_features(bit(F_VERSION_1))
    session.set_status(0xF)
    kick = eventfd()
    session.set_vring_kick(0, kick)
    if how == "status":
        session.set_status(0)
    else:
        session.reset_device()
    assert session.features == 0 and session.status == 0 and kick.fd == -1
    assert not any(v.started or v.enabled or v.kick for v in session.vrings)
    assert session.owner and session.protocol_features == bit(ProtocolFeature.RESET_DEVICE)
    assert session.device.log[-1] == ("reset",)


def test_get_vring_base_after_set_status_0_answers_where_the_ring_stopped(session):
    # QEMU 7.2 stops a device with SET_STATUS 0 and then GET_VRING_BASE per ring
    # (vhost_dev_stop); the positions it reads go to a migration destination.
    with_memory(session)
    session.set_vring_num(VringState(1, 256))
    session.set_vring_addr(VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0))
    session.set_vring_base(VringState(1, 0))
    session.set_vring_kick(1, eventfd())
    session.set_status(0xF)
    session.set_status(0)
    assert VringState.unpack(session.get_vring_base(VringState(1, 0))).num == 0x101
    # an unconfigured ring, and the second read, ask the device as before
    assert VringState.unpack(session.get_vring_base(VringState(0, 0))).num == 0x1234
    assert VringState.unpack(session.get_vring_base(VringState(1, 0))).num == 0x1234
    # set up again: the stopped position is gone
    session.set_status(0xF)
    session.set_vring_kick(1, eventfd())
    session.set_status(0)
    session.set_vring_base(VringState(1, 7))
    assert VringState.unpack(session.get_vring_base(VringState(1, 0))).num == 0x1234


def test_reset_device_needs_its_protocol_feature(session):
    with pytest.raises(RequestError, match="RESET_DEVICE"):
        session.reset_device()


def test_close_with_a_stuck_worker_leaves_the_fds_to_the_device(session):
    kick, call = eventfd(), eventfd()
    session.set_vring_kick(0, kick)
    session.set_vring_call(1, call)
    session.device.stuck = True
    session.close()
    assert session.conn.closed
    assert session.device.held == [kick, call] and kick.fd >= 0 and call.fd >= 0
    assert not any(v.kick or v.call for v in session.vrings)
    for f in session.device.held:
        f.close()
    session.device.stuck = False
