"""One frontend connection: negotiated features, owner, memory, vrings, ring states.

Implements the meaning of the vhost-user front-end requests ("Front-end message
types" and "Ring states" in the spec): the third validation layer, after
protocol.py (syntax) and dispatch.py (payload size, fd count, vring index).
dispatch.REQUEST_TABLE calls these handlers with only what each needs; a handler
raises RequestError to refuse a request.
"""
from __future__ import annotations

import logging
import time

from vhostd.connection import Connection
from vhostd.device import NetDevice
from vhostd.dirty_log import map_log
from vhostd.errors import RequestError, WorkerStuck
from vhostd.fds import OwnedFd, is_eventfd
from vhostd.native import lib
from vhostd.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    LogArea,
    MemRegion,
    ProtocolFeature,
    VringAddr,
    VringState,
    bit,
    pack_u64,
)
from vhostd.virtio_net import F_RING_PACKED, broken_dependencies, feature_names
from vhostd.vring import Vring

# Alignment of the ring parts (virtio 1.1 §2.6 split: desc 16, avail 2, used 4;
# §2.7.10.1 packed: desc 16, driver and device event areas 4), as (desc, avail, used).
_SPLIT_ALIGN = (16, 2, 4)
_PACKED_ALIGN = (16, 4, 4)

# virtio 1.2 §2.6 (split: a power of 2) and §2.7 (packed: any size) both cap a
# queue at 32768 entries; the datapath's limit is the same constant.
MAX_QUEUE_SIZE = lib.VR_MAX_QUEUE_SIZE


class Session:
    def __init__(self, device: NetDevice, conn: Connection, log: logging.LoggerAdapter, peer: str = ""):
        self.device = device
        self.queue_pairs = device.queue_pairs
        self.conn = conn
        self.log = log
        self.peer = peer
        self.vrings = [Vring(i) for i in range(2 * device.queue_pairs)]
        self.features = 0
        self.protocol_features = 0
        # Offloads ignored: logged once per device life (a reset lets it log again).
        self._ignored_logged = False
        # SET_OWNER starts the session: dispatch refuses the requests that act on the
        # device until then (Row.owner). SET_STATUS is echoed by GET_STATUS; status 0
        # (and RESET_DEVICE) reset the device.
        self.owner = False
        self.status = 0
        self.errors = 0
        self._features_acked = False        # a SET_FEATURES was served
        self.log_fd: OwnedFd | None = None  # SET_LOG_FD: kept, never written (QEMU polls the log)
        self.since = time.time()
        self._resync_pending: set[int] = set()  # vrings with a SET_VRING_BASE not yet checked

    def close(self) -> None:
        try:
            self._reset_device()
        except WorkerStuck:
            pass  # the device keeps what the worker may use; the port fails and closes it
        finally:
            self._drop_log_fd()
            self.conn.close()

    def _drop_log_fd(self) -> None:
        if self.log_fd is not None:
            self.log_fd.close()
            self.log_fd = None

    def _reset_device(self, keep_memory: bool = False) -> dict[int, int]:
        """Every ring idle and memory unmapped (unless keep_memory), then the vring fds
        closed: only once no worker watches them. A stuck worker may still use them:
        the device holds them until it comes back (WorkerStuck goes on, the port fails)."""
        try:
            bases = self.device.reset(keep_memory) or {}
        except WorkerStuck:
            self.device.hold([f for v in self.vrings for f in v.take_fds()])
            raise
        for v in self.vrings:
            v.release()
        return bases

    # --- helpers for dispatch --------------------------------------------------

    def protocol_acked(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & bit(feature))

    def count_error(self) -> None:
        self.errors += 1

    def _apply(self, vring: Vring, base: int | None = None) -> None:
        """Pushes a vring into the datapath and records what the device found."""
        vring.mapped = self.device.apply(vring, base)

    def _note_mapped(self, mapped: list[bool]) -> None:
        for v in self.vrings:
            v.mapped = mapped[v.index]

    def describe(self) -> dict:
        return {
            "peer": self.peer,
            "since": self.since,
            "features": self.features,
            "feature_names": feature_names(self.features),
            "protocol_features": self.protocol_features,
            "protocol_feature_names": [
                f.name for f in ProtocolFeature if self.protocol_features >> f & 1
            ],
            "memory_regions": len(self.device.mem),
            "memory_bytes": self.device.mem.total_size,
            "vrings": [v.describe() for v in self.vrings],
            "queue_pairs_enabled": sum(
                1 for i in range(self.device.queue_pairs) if self.vrings[2 * i].enabled and self.vrings[2 * i + 1].enabled
            ),
            "request_errors": self.errors,
            "dirty_log": {
                "logging": self.dirty_logging,
                "log_bytes": self.device.log.words * 8 if self.device.log is not None else 0,
                **self.device.log_counters(),
            },
        }

    @property
    def dirty_logging(self) -> bool:
        """LOG_ALL negotiated: the workers mark what they write in the dirty log."""
        return bool(self.features & bit(F_LOG_ALL))

    # --- features ----------------------------------------------------------------

    def get_features(self) -> bytes:
        return pack_u64(self.device.features)

    def set_features(self, features: int) -> None:
        extra = features & ~self.device.features
        if extra:
            raise RequestError(f"features {extra:#x} were not offered (offered {self.device.features:#x})")
        # Only never-offered features are refused: a set with broken dependencies is
        # what a real guest acks under some virtio-net-pci properties; refusing it
        # would leave its NIC dead. The offloads lacking a prerequisite go unused.
        broken = broken_dependencies(features)
        if broken and not self._ignored_logged:
            self._ignored_logged = True
            self.log.warning("features %#x: offloads ignored (%s)", features, "; ".join(broken))
        was, self.features = self.features, features
        self._note_mapped(self.device.set_features(features))
        if self._features_acked and not (was ^ features) & ~bit(F_LOG_ALL):
            # Only LOG_ALL changed (a migration starting or ending), or nothing did
            # (QEMU sends SET_FEATURES once per queue pair): one line, not the list.
            if (was ^ features) & bit(F_LOG_ALL):
                self._log_logging()
        else:
            self.log.info("features: %s", " ".join(feature_names(features)) or "none")
            if features & bit(F_LOG_ALL):
                self._log_logging()
        self._features_acked = True
        if not features & bit(F_PROTOCOL_FEATURES):
            # Spec: without PROTOCOL_FEATURES rings are enabled from the start.
            for v in self.vrings:
                if not v.enabled:
                    v.enabled = True
                    self._apply(v)

    def _log_logging(self) -> None:
        if not self.features & bit(F_LOG_ALL):
            self.log.info("dirty logging off (%d pages marked so far)", self.device.log_counters()["pages_marked"])
        elif self.device.log is None:
            self.log.warning("LOG_ALL acked before SET_LOG_BASE: nothing is logged until a log arrives")
        else:
            self.log.info("dirty logging on (log of %d KiB)", self.device.log.words * 8 >> 10)

    def get_protocol_features(self) -> bytes:
        return pack_u64(self.device.protocol_features)

    def set_protocol_features(self, features: int) -> None:
        extra = features & ~self.device.protocol_features
        if extra:
            raise RequestError(f"protocol features {extra:#x} were not offered")
        self.protocol_features = features

    def get_queue_num(self) -> bytes:
        return pack_u64(self.device.queue_pairs)

    def set_owner(self) -> None:
        self.owner = True

    def reset_owner(self) -> None:
        """Deprecated RESET_OWNER: back to the state of a fresh connection. The spec
        recommends that back-ends "either ignore this message, or use it to reset all
        state"; we reset all of it: rings stopped and their kick/call/err fds closed,
        memory unmapped and its fds closed, the dirty log unmapped and its fd closed,
        virtio and protocol features, status and the ownership itself cleared. A new
        set-up starts with SET_OWNER again, as on a new connection."""
        self._reset_device()
        self._forget_saved(self.vrings)
        self._drop_log_fd()
        self._features_acked = False
        self._ignored_logged = False
        self._resync_pending.clear()
        self.vrings = [Vring(i) for i in range(2 * self.device.queue_pairs)]
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.owner = False
        self.log.info("device reset by frontend (RESET_OWNER)")

    async def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (protocol feature NET_MTU): the MTU QEMU exposes to the guest
        (host_mtu). The TAP follows it so that frames of that size pass both ways."""
        if not self.protocol_acked(ProtocolFeature.NET_MTU):
            raise RequestError("NET_SET_MTU without the NET_MTU protocol feature")
        if not 68 <= mtu <= 65535:
            raise RequestError(f"MTU {mtu} out of range (68..65535)")
        # A SetupError (above the TAP's max MTU 65521, no CAP_NET_ADMIN) is a
        # refused request: dispatch answers it with a failure reply.
        await self.device.change_mtu(mtu)
        self.log.info("MTU %d", mtu)

    def set_status(self, status: int) -> None:
        if status > 0xFF:
            raise RequestError(f"device status {status:#x} does not fit in 8 bits")
        if status == 0 and self.status != 0:
            # virtio 1.2 §2.1: writing 0 to the status resets the device.
            self._device_reset("SET_STATUS 0")
        self.status = status

    def reset_device(self) -> None:
        """RESET_DEVICE (protocol feature RESET_DEVICE)."""
        if not self.protocol_acked(ProtocolFeature.RESET_DEVICE):
            raise RequestError("RESET_DEVICE without the RESET_DEVICE protocol feature")
        self._device_reset("RESET_DEVICE")

    def _device_reset(self, why: str) -> None:
        """The spec's device reset: every ring stopped and forgotten (fds closed,
        addresses and bases dropped) and the virtio features cleared. Kept, as the
        spec says the back-end retains ownership across a reset: the owner, the
        negotiated protocol features and the memory table (the frontend's memory
        does not change with the device's state; it sends a new table if it does)."""
        bases = self._reset_device(keep_memory=True)
        self._forget_saved(self.vrings)
        old, self.vrings = self.vrings, [Vring(i) for i in range(2 * self.device.queue_pairs)]
        # QEMU 7.2 stops a device with SET_STATUS 0 first and GET_VRING_BASE after
        # (vhost_dev_stop): each ring that was set up answers where it stopped, in
        # the format it ran with, until it is set up again.
        for v in old:
            if v.configured and v.index in bases:
                self.vrings[v.index].stopped_at = bases[v.index]
        self.features = 0
        self.status = 0
        self._resync_pending.clear()
        self._ignored_logged = False  # the next SET_FEATURES is a new driver's: log it again
        self.log.info("device reset (%s)", why)

    def get_status(self) -> bytes:
        return pack_u64(self.status)

    # --- memory ------------------------------------------------------------------

    def set_mem_table(self, regions: list[MemRegion], fds: list[OwnedFd]) -> None:
        if len(fds) != len(regions):
            raise RequestError(f"{len(regions)} memory regions but {len(fds)} fds")
        mapped = self.device.mem.prepare(regions, fds)
        self._note_mapped(self.device.install_memory(mapped))
        self.log.info(
            "memory table: %d regions, %d MiB", len(regions), sum(r.size for r in regions) >> 20
        )
        for v in self.vrings:
            if v.configured and not v.mapped:
                self.log.warning("vring %d: rings are not inside the new memory table", v.index)

    # --- live migration (vhost-user spec, "Migration") -------------------------------

    def set_log_base(self, area: LogArea, fds: list[OwnedFd]) -> bytes:
        """Maps the dirty log and hands it to every worker. QEMU waits for the reply
        (with LOG_SHMFD negotiated) before it starts harvesting."""
        if not self.protocol_acked(ProtocolFeature.LOG_SHMFD):
            raise RequestError("SET_LOG_BASE without the LOG_SHMFD protocol feature")
        if len(fds) != 1:
            raise RequestError("no log fd attached")
        top = max((m.region.gpa + m.region.size for m in self.device.mem.regions), default=0)
        new = map_log(area.size, area.offset, fds[0], top)
        try:
            self.device.install_log(new)
        except BaseException:
            if self.device.log is not new:
                new.release()
            raise
        self.log.info("dirty log: %d KiB at offset %#x, covers guest memory up to %#x",
                      area.size >> 10, area.offset, new.covers)
        return pack_u64(0)

    def set_log_fd(self, payload: bytes, fds: list[OwnedFd]) -> None:
        """SET_LOG_FD: the eventfd a backend may signal after it updated the log.
        Our marks are plain memory writes QEMU harvests on its own schedule, so the
        fd is kept (and closed with the connection), not written."""
        if len(payload) not in (0, 8):
            raise RequestError(f"payload of {len(payload)} bytes (none or a u64 expected)")
        fd = fds[0] if fds else None
        if fd is not None and not is_eventfd(fd.fd):
            raise RequestError("log fd is not an eventfd")
        self._drop_log_fd()
        self.log_fd = fd

    def send_rarp(self, payload: int) -> None:
        """SEND_RARP: after a migration, a broadcast RARP frame from the guest's MAC
        (the first 6 bytes of the payload) goes out through the TAP, so that bridges
        and switches learn where the guest is now."""
        if not self.protocol_acked(ProtocolFeature.RARP):
            raise RequestError("SEND_RARP without the RARP protocol feature")
        mac = payload.to_bytes(8, "little")[:6]
        if mac[0] & 1 or mac == bytes(6):
            raise RequestError(f"MAC {mac.hex(':')} is not a unicast address")
        try:
            self.device.inject(rarp_frame(mac))
        except OSError as exc:
            raise RequestError(f"cannot write the RARP frame to the TAP: {exc.strerror}") from None
        self.log.info("announced %s (RARP)", mac.hex(":"))

    def get_max_mem_slots(self) -> bytes:
        """GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS): the datapath's region table size."""
        return pack_u64(lib.VR_MAX_REGIONS)

    def add_mem_reg(self, region: MemRegion, fds: list[OwnedFd]) -> None:
        """ADD_MEM_REG: maps only the new region; the workers pause for the table swap."""
        if len(fds) != 1:
            raise RequestError(f"memory region gpa {region.gpa:#x}: no fd attached")
        same = self.device.mem.identical(region, fds[0])
        if same is not None:  # QEMU 7.2 with several queue pairs: one ADD per pair
            fds[0].close()
            same.refs += 1
            self.log.debug("memory region gpa %#x size %#x added again (%d references)",
                           region.gpa, region.size, same.refs)
            return
        try:
            table = self.device.mem.with_added(region, fds[0])
        finally:
            fds[0].close()  # a no-op when with_added took it; closes a refused one
        self._swap_memory(table, f"memory region added: gpa {region.gpa:#x} size {region.size:#x}")

    def rem_mem_reg(self, region: MemRegion, fds: list[OwnedFd]) -> None:
        """REM_MEM_REG: QEMU attaches the region's fd again; it is not needed and closed.
        Only the removed region is unmapped, after the swap."""
        for fd in fds:
            fd.close()
        m = self.device.mem.find(region)
        if m is not None and m.refs > 1:  # added once per queue pair: the last one unmaps
            m.refs -= 1
            self.log.debug("memory region gpa %#x size %#x: %d references left", region.gpa, region.size, m.refs)
            return
        table = self.device.mem.without(region)
        self._swap_memory(table, f"memory region removed: gpa {region.gpa:#x} size {region.size:#x}")

    def _swap_memory(self, table, what: str) -> None:
        was = {v.index for v in self.vrings if v.mapped}
        self._note_mapped(self.device.install_memory(table))
        self.log.info("%s (%d regions)", what, len(table))
        for v in self.vrings:
            if v.configured and v.index in was and not v.mapped:
                self.log.warning("vring %d: rings are no longer inside guest memory", v.index)

    # --- vrings ------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return bool(self.features & bit(F_RING_PACKED))

    def set_vring_num(self, state: VringState) -> None:
        num = state.num
        if self.packed:
            if not 1 <= num <= MAX_QUEUE_SIZE:
                raise RequestError(f"vring {state.index} size {num:#x} invalid (packed: 1..{MAX_QUEUE_SIZE:#x})")
        elif num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RequestError(f"vring {state.index} size {num:#x} invalid (power of 2, 1..{MAX_QUEUE_SIZE:#x})")
        v = self.vrings[state.index]
        v.num, v.stopped_at = num, None
        self._apply(v)

    def set_vring_addr(self, addr: VringAddr) -> None:
        if addr.flags & ~VringAddr.F_LOG:
            raise RequestError(f"vring {addr.index} address flags {addr.flags:#x} unknown")
        for what, uva, align in zip(("desc", "avail", "used"), (addr.desc, addr.avail, addr.used),
                                    _PACKED_ALIGN if self.packed else _SPLIT_ALIGN):
            if uva % align:
                raise RequestError(f"vring {addr.index} {what} address {uva:#x} not {align}-byte aligned")
        v = self.vrings[addr.index]
        old, v.addr, v.stopped_at = v.addr, addr, None
        self._apply(v)
        if len(self.device.mem) and v.num and not v.mapped:
            if old is not None:  # refused: the ring keeps the addresses it had
                v.addr = old
                self._apply(v)
            raise RequestError(
                f"vring {addr.index}: desc {addr.desc:#x} avail {addr.avail:#x} used {addr.used:#x} "
                "not inside guest memory"
            )

    def set_vring_base(self, state: VringState) -> None:
        v = self.vrings[state.index]
        if not self.packed and state.num > 0xFFFF:
            raise RequestError(f"vring {state.index} base {state.num:#x} out of range for a split ring")
        if self.packed and v.num:
            avail, used = state.num & 0x7FFF, state.num >> 16 & 0x7FFF
            if avail >= v.num or (state.num >> 16 and used >= v.num):
                raise RequestError(f"vring {state.index} base {state.num:#x}: slot beyond size {v.num:#x}")
        v.base, v.stopped_at = state.num, None
        self._resync_pending.add(v.index)
        self._apply(v, base=state.num)

    def _resync_base(self, v: Vring) -> int | None:
        """Split rings, once per SET_VRING_BASE, when the ring starts (kick fd or enable)
        with its rings mapped: if the base (last_avail_idx) disagrees with used->idx
        in guest memory, restart from used->idx and return it (None: keep the base).

        Our device never holds a chain across a stop, so a disagreement means the
        previous backend died with chains consumed but not marked used (a frontend
        that sends its own last_avail_idx after a backend crash). Resyncing to
        used->idx, as DPDK's and libvhost-user's backends do, makes the guest's view
        authoritative: on TX those chains are sent again (the dead backend may have
        written some to the TAP already: duplicates), on RX their buffers are
        refilled (frames the dead backend had put there but not published are lost).
        """
        if v.index not in self._resync_pending or not v.mapped or v.addr is None:
            return None
        self._resync_pending.discard(v.index)
        if self.packed:
            return self._resume_packed(v)
        used_idx = self._read_used_idx(v.addr.used)
        if used_idx is None or used_idx == v.base:
            return None
        self.log.warning("vring %d: base %#x disagrees with used idx %#x in guest memory (backend "
                         "restarted with chains in flight?): resuming at %#x", v.index, v.base, used_idx, used_idx)
        v.base = used_idx
        return used_idx

    def _resume_packed(self, v: Vring) -> int | None:
        """Packed rings: guest memory holds no used index, and after a backend crash
        QEMU 7.2 resends the positions of its last clean stop only (its packed
        "restore" does nothing). The worker of the previous daemon published its
        positions into a file of the runtime directory (saved_rings); when they
        belong to this very ring (same size, descriptor address and memory file),
        resume where it had published used descriptors, both halves there (chains
        taken but not used are taken again, as for split rings). Then this ring is
        claimed: our worker publishes into its slot from now on."""
        saved = self.device.saved
        ident = self.device.ring_identity(v) if saved is not None else None
        if ident is None:
            return None
        rec = saved.saved(v.index, ident)
        pos = self._packed_position(v, *rec) if rec is not None else None
        saved.claim(v.index, ident)
        v.saved_slot = saved.c_slot(v.index)
        if pos is None or pos | pos << 16 == v.base:
            return None
        self.log.warning("vring %d: resuming a packed ring at slot %#x wrap %d where the previous vhostd "
                         "left it (the frontend's base %#x is from its last clean stop)",
                         v.index, pos & 0x7FFF, pos >> 15, v.base)
        v.base = pos | pos << 16
        return v.base

    def _packed_position(self, v: Vring, used: int | None, batch: int) -> int | None:
        """The used position the driver has seen (struct vr_vq_saved in csrc/vhostd.h):
        the last batch's end if the flag of its first descriptor was written, its
        start if that descriptor still reads as the driver's available one of its lap."""
        if batch:
            first, after = batch & 0xFFFF, batch >> 16
            slot, wrap = first & 0x7FFF, first >> 15
            if slot >= v.num:
                return None
            raw = self.device.mem.pread(v.addr.desc + 16 * slot + 14, 2)  # le16 flags
            if raw is None:
                return None
            flags = int.from_bytes(raw, "little")
            still_available = bool(flags & 0x80) == bool(wrap) and bool(flags & 0x8000) != bool(wrap)
            pos = first if still_available else after
        elif used is not None:
            pos = used
        else:
            return None
        return pos if (pos & 0x7FFF) < v.num else None

    def _forget_saved(self, vrings) -> None:
        """These rings' positions are the frontend's again (GET_VRING_BASE, a reset)."""
        for v in vrings:
            if v.saved_slot is not None:
                v.saved_slot = None
                if self.device.saved is not None:
                    self.device.saved.forget(v.index)

    def _read_used_idx(self, used_uva: int) -> int | None:
        """le16 used->idx, read from the region's file (GuestMemory.pread)."""
        data = self.device.mem.pread(used_uva + 2, 2)
        return int.from_bytes(data, "little") if data is not None else None

    def get_vring_base(self, state: VringState) -> bytes:
        v = self.vrings[state.index]
        if v.stopped_at is not None:  # stopped by a device reset, not set up since
            base, v.stopped_at = v.stopped_at, None
            return VringState(state.index, base).pack()
        base = self.device.stop_vring(v)
        self._forget_saved([v])
        v.started = False
        self.log.debug("vring %d stopped at %#x", v.index, base)
        return VringState(state.index, base).pack()

    def _set_fd(self, index: int, fd: OwnedFd | None, attr: str) -> None:
        """Installs a kick/call/err fd (None: the frontend's no-fd flag). The fd is
        used in the blocking mode the frontend chose: the flag lives on the file
        description it shares, and changing it would change its own reads. A
        blocking fd that would make the worker sleep (a full call or err counter, a
        kick counter the frontend drained) is ended by the pause's nudge, and that
        vring stops (csrc/vr_internal.h, vr_efd_signal)."""
        if fd is not None and not is_eventfd(fd.fd):
            raise RequestError(f"vring {index} {attr}: fd is not an eventfd")
        v = self.vrings[index]
        old = v.replace_fd(attr, fd)
        base = None
        if attr == "kick":
            v.started, v.stopped_at = fd is not None, None
            base = self._resync_base(v) if v.started else None
        self._apply(v, base)  # C stops watching the old fd first ...
        if old is not None:
            old.close()  # ... then it is closed

    def set_vring_kick(self, index: int, fd: OwnedFd | None) -> None:
        if fd is None:
            raise RequestError(f"vring {index}: polling mode (no kick fd) is not supported")
        self._set_fd(index, fd, "kick")

    def set_vring_call(self, index: int, fd: OwnedFd | None) -> None:
        self._set_fd(index, fd, "call")

    def set_vring_err(self, index: int, fd: OwnedFd | None) -> None:
        self._set_fd(index, fd, "err")

    def set_vring_enable(self, state: VringState) -> None:
        if state.num not in (0, 1):
            raise RequestError(f"vring {state.index} enable value {state.num:#x} (0 or 1)")
        v = self.vrings[state.index]
        v.enabled = bool(state.num)
        self._apply(v, self._resync_base(v) if v.enabled else None)


ETH_P_RARP = 0x8035


def rarp_frame(mac: bytes) -> bytes:
    """RFC 903 reverse request (op 3), broadcast, from and about `mac`, padded to the
    60-byte Ethernet minimum: what bridges learn the guest's new port from."""
    eth = b"\xff" * 6 + mac + ETH_P_RARP.to_bytes(2, "big")
    arp = (b"\x00\x01" b"\x08\x00" b"\x06\x04" b"\x00\x03"  # Ethernet, IPv4, 6/4 bytes, op 3
           + mac + bytes(4) + mac + bytes(4))
    return (eth + arp).ljust(60, b"\x00")
