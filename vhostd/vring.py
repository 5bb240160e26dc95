"""Per-virtqueue configuration as the frontend set it (vhost-user spec, "Ring states").

A ring is *started* by SET_VRING_KICK and *stopped* by GET_VRING_BASE; it is,
independently, *enabled* or *disabled* by SET_VRING_ENABLE (rings start disabled
when VHOST_USER_F_PROTOCOL_FEATURES is negotiated, enabled otherwise). This
object mirrors what the C side holds so that the control plane can validate and
report without asking the datapath; net.py pushes it into C.
"""
from __future__ import annotations

from dataclasses import dataclass

from vhostd.fds import OwnedFd
from vhostd.protocol import VringAddr


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

    def release(self) -> None:
        for attr in ("kick", "call", "err"):
            f = getattr(self, attr)
            if f is not None:
                f.close()
                setattr(self, attr, None)

    def describe(self) -> dict:
        return {
            "index": self.index,
            "num": self.num,
            "started": self.started,
            "enabled": self.enabled,
            "mapped": self.mapped,
        }
