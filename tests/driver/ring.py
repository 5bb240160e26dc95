"""What every guest-side ring driver shares, whatever the ring layout: the packet
buffer pool, posting helpers, kicks, and waiting for used entries.

Subclasses (split.SplitRing, packed.PackedRing) provide add_chain, publish,
needs_kick, get_used and _progress (a short state string for timeout messages),
and set mem, num, buf_region, _pool, kick_fd and call_fd.
"""
from __future__ import annotations

import os
import select
import time
from typing import Sequence


class RingDriver:
    # --- buffer pool (guest memory for packet data) -------------------------
    def alloc_buf(self, size: int) -> int:
        """A guest buffer of at least `size` bytes (power-of-two size classes,
        recycled when the chain comes back used)."""
        return self._chunk(size)[1]

    def _chunk(self, size: int) -> tuple[int, int]:
        cls = 64
        while cls < size:
            cls <<= 1
        lst = self._pool.get(cls)
        if lst:
            return cls, lst.pop()
        return cls, self.mem.alloc(cls, 64, self.buf_region)

    def _release(self, chunks: Sequence[tuple[int, int]]) -> None:
        for cls, gpa in chunks:
            self._pool.setdefault(cls, []).append(gpa)

    # --- posting ------------------------------------------------------------
    def _fill(self, ch, out: Sequence[bytes], in_sizes: Sequence[int]) -> None:
        """Gives chain `ch` its buffers: readable ones holding `out`, then writable
        ones of `in_sizes` (ch.chunks, ch.bufs as (gpa, len, writable), ch.in_capacity)."""
        for b in out:
            cls, gpa = self._chunk(len(b))
            ch.chunks.append((cls, gpa))
            if b:
                self.mem.write(gpa, b)
            ch.bufs.append((gpa, len(b), False))
        for sz in in_sizes:
            cls, gpa = self._chunk(sz)
            ch.chunks.append((cls, gpa))
            ch.bufs.append((gpa, sz, True))
            ch.in_capacity += sz

    def add_out(self, bufs: Sequence[bytes], indirect: bool | None = None) -> int:
        """Device-readable chain (TX): each bytes object becomes one descriptor."""
        return self.add_chain(bufs, (), indirect)

    def add_in(self, sizes: Sequence[int], indirect: bool | None = None) -> int:
        """Device-writable chain (RX) of buffers of the given sizes."""
        return self.add_chain((), sizes, indirect)

    def kick(self) -> None:
        if self.kick_fd is None:
            raise RuntimeError("ring has no kick fd (setup_net sets one)")
        os.eventfd_write(self.kick_fd, 1)

    def publish_and_kick(self) -> bool:
        """publish(), then kick if needs_kick(); returns whether it kicked."""
        self.publish()
        if self.needs_kick():
            self.kick()
            return True
        return False

    # --- completion -----------------------------------------------------------
    def wait_used(self, n: int = 1, timeout: float = 5.0) -> list:
        """Collect at least n used entries, blocking on the call eventfd when
        there is one (and polling the ring too, for suppressed calls)."""
        deadline = time.monotonic() + timeout
        got: list = []
        while True:
            got += self.get_used()
            if len(got) >= n:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)}/{n} used entries after {timeout}s ({self._progress()})")
            if self.call_fd is not None:
                r, _, _ = select.select([self.call_fd], [], [], min(left, 0.02))
                if r:
                    self.drain_call()
            else:
                time.sleep(min(left, 0.001))

    def drain_call(self) -> int:
        """Read (reset) the call eventfd; returns the count, 0 if none."""
        if self.call_fd is None:
            return 0
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0
