"""Ring positions that outlive the daemon, for packed rings after a crash.

After a backend restart QEMU 7.2 replays the set-up with the ring positions it
saved at the last clean stop (for split rings it reads used->idx from guest
memory, and session.py checks that; for packed rings it cannot). So each worker
publishes its positions after every burst into a small file of the runtime
directory (tmpfs: it survives the process, not a reboot), one 64-byte slot per
vring:

    bytes  0..15  struct vr_vq_saved, written by the worker: seq (odd while
                  writing), avail and used positions (SET/GET_VRING_BASE halves)
    bytes 32..63  the ring's identity, written by the control plane when the
                  ring starts: magic, ring size, descriptor ring gpa, and the
                  device and inode of the guest memory file holding it

A restarted vhostd resumes a packed ring at the saved positions only when the
identity matches the ring the frontend is setting up now (the same guest memory
file: the same QEMU process) and the saved positions are whole (even seq).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass

from vhostd.native import ffi

SLOT = 64
_C_PART = struct.Struct("=QHHI")            # struct vr_vq_saved: seq, avail, used, batch
_IDENTITY = struct.Struct("=IIQQQ")         # magic, num, desc gpa, st_dev, st_ino
_ID_OFFSET = 32
MAGIC = 0x76727331                          # "vrs1"


@dataclass(frozen=True)
class RingIdentity:
    num: int
    desc_gpa: int
    dev: int
    ino: int


def state_path(state_dir: str, port: str, socket_path: str) -> str:
    """One file per port and socket path (two daemons may serve equal port names)."""
    h = hashlib.sha1(os.path.abspath(socket_path or port).encode()).hexdigest()[:12]
    return os.path.join(state_dir, f"{port}-{h}.rings")


class SavedRings:
    """The mapped state file of one port; slot i belongs to vring i."""

    def __init__(self, path: str, nvrings: int):
        self.path = path
        size = SLOT * nvrings
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)         # another layout: nothing in it is ours
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.buf = ffi.from_buffer(self.map)
        self.nvrings = nvrings

    def c_slot(self, index: int):
        """The struct vr_vq_saved * of vring `index`, for vr_qp_set_saved."""
        return ffi.cast("struct vr_vq_saved *", ffi.addressof(self.buf, SLOT * index))

    def saved(self, index: int, ident: RingIdentity) -> tuple[int | None, int] | None:
        """What the previous daemon left for this very ring: (used, batch), used None
        when it was killed while publishing (torn), batch 0 when no batch was
        flushed since the ring was claimed (struct vr_vq_saved); None when the slot
        holds another ring or nothing."""
        off = SLOT * index
        magic, num, desc_gpa, dev, ino = _IDENTITY.unpack_from(self.map, off + _ID_OFFSET)
        seq, _avail, used, batch = _C_PART.unpack_from(self.map, off)
        if magic != MAGIC or RingIdentity(num, desc_gpa, dev, ino) != ident:
            return None
        return (None if not seq or seq & 1 else used), batch

    def claim(self, index: int, ident: RingIdentity) -> None:
        """The ring now being served: its identity, and nothing of the previous
        daemon's positions (the worker publishes ours once it has the slot)."""
        off = SLOT * index
        self.map[off:off + _ID_OFFSET] = bytes(_ID_OFFSET)
        _IDENTITY.pack_into(self.map, off + _ID_OFFSET, MAGIC, ident.num, ident.desc_gpa, ident.dev, ident.ino)

    def forget(self, index: int) -> None:
        self.map[SLOT * index:SLOT * (index + 1)] = bytes(SLOT)

    def empty(self) -> bool:
        return not any(self.map[SLOT * i + _ID_OFFSET:SLOT * i + _ID_OFFSET + 4] != bytes(4)
                       for i in range(self.nvrings))

    def close(self, remove: bool = False) -> None:
        """Unmaps; with `remove` the file goes too (no ring of it is worth keeping)."""
        del self.buf
        self.map.close()
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
