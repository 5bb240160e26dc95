"""One virtqueue as the frontend configured it, and the vring lifecycle.

Lifecycle (vhost-user spec "Ring states"; the C datapath holds a copy of each
flag, pushed by device.apply):

  num, addr, base  SET_VRING_NUM / SET_VRING_ADDR / SET_VRING_BASE; kept across
                   a stop and a start.
  started          SET_VRING_KICK with an fd starts the ring; GET_VRING_BASE
                   stops it and returns where the device stopped. Replacing the
                   kick fd of a started ring keeps it started.
  enabled          SET_VRING_ENABLE 1/0, independent of started. With
                   VHOST_USER_F_PROTOCOL_FEATURES negotiated rings start
                   disabled; without it SET_FEATURES enables every ring.
  mapped           a fact the device reports (apply, install_memory,
                   set_features): C could translate desc, avail and used through
                   the current memory table. A new table or address re-maps.
  broken           set by the C worker alone when the guest breaks the ring (bad
                   chain, buffer outside memory, blocking eventfd ...): counted
                   and logged (device.check_events), never stored here. A new
                   SET_VRING_BASE clears it, and so does the next frontend.

  serviced = num and mapped and started and not broken (C: vr_vq_ready). A
  serviced ring that is disabled consumes TX chains and drops them
  (drop_disabled); on RX it takes no frames from the TAP.

One writer: only Session changes started, enabled and mapped. The device reads
a Vring to push it into C and returns facts; it never writes one. TAP queue
steering (a multi-queue TAP sends host frames only to pairs whose RX ring is
enabled) is the device's own state.

The kick/call/err fds are owned here; a replaced or released fd is closed only
once the datapath no longer watches it (Session._set_fd, Session._reset_device).
"""
from __future__ import annotations

from dataclasses import dataclass

from vhostd.fds import OwnedFd
from vhostd.protocol import VringAddr

_FDS = ("kick", "call", "err")


@dataclass
class Vring:
    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: OwnedFd | None = None
    call: OwnedFd | None = None
    err: OwnedFd | None = None
    started: bool = False
    enabled: bool = False
    mapped: bool = False  # the C side could translate its rings
    stopped_at: int | None = None  # GET_VRING_BASE's answer after a device reset
    saved_slot: object = None  # packed: struct vr_vq_saved * its worker publishes into (saved_rings)

    @property
    def qp(self) -> int:
        """Queue pair of this vring: vring 2n is RX of pair n, 2n+1 its TX."""
        return self.index // 2

    @property
    def which(self) -> int:
        return self.index % 2  # VR_RX = 0, VR_TX = 1

    @property
    def configured(self) -> bool:
        return self.num != 0 and self.addr is not None

    def replace_fd(self, attr: str, new: OwnedFd | None) -> OwnedFd | None:
        """Installs a new kick/call/err fd and returns the old one for the caller to close
        once the datapath no longer watches it."""
        old = getattr(self, attr)
        setattr(self, attr, new)
        return old

    def take_fds(self) -> list[OwnedFd]:
        """Detaches every fd of the vring and returns them (the caller now owns them)."""
        return [f for f in (self.replace_fd(a, None) for a in _FDS) if f is not None]

    def release(self) -> None:
        """Closes every fd of the vring (the datapath no longer watches them)."""
        for f in self.take_fds():
            f.close()

    def describe(self) -> dict:
        return {
            "index": self.index,
            "num": self.num,
            "started": self.started,
            "enabled": self.enabled,
            "mapped": self.mapped,
        }
