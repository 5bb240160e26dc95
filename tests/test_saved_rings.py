"""saved_rings.py and Session's packed-ring resume: which saved positions belong
to the ring being set up, and which used position the driver has really seen."""
from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest

from vhostd.saved_rings import SLOT, RingIdentity, SavedRings, state_path
from vhostd.session import Session
from vhostd.vring import Vring

AVAIL, USED = 0x80, 0x8000        # packed descriptor flag bits (virtio 1.1 §2.7.1)
ID = RingIdentity(num=256, desc_gpa=0x10000, dev=1, ino=2)


@pytest.fixture
def rings(tmp_path):
    r = SavedRings(state_path(str(tmp_path), "p", "/run/x.sock"), 4)
    yield r
    r.close()


def _publish(rings, index, seq, avail, used, batch):
    struct.pack_into("=QHHI", rings.map, SLOT * index, seq, avail, used, batch)


def test_saved_positions_belong_to_one_ring_only(rings):
    assert rings.saved(1, ID) is None                       # nothing there
    rings.claim(1, ID)
    _publish(rings, 1, 2, 0x8005, 0x8003, 0)
    assert rings.saved(1, ID) == (0x8003, 0)
    assert rings.saved(1, RingIdentity(256, 0x10000, 1, 3)) is None   # another memory file
    assert rings.saved(1, RingIdentity(128, 0x10000, 1, 2)) is None   # another size
    _publish(rings, 1, 3, 0x8005, 0x8003, 0x80098005)
    assert rings.saved(1, ID) == (None, 0x80098005)          # killed while publishing
    assert not rings.empty()
    rings.claim(1, ID)                                      # a new daemon's ring: nothing of the old
    assert rings.saved(1, ID) == (None, 0)
    rings.forget(1)
    assert rings.saved(1, ID) is None and rings.empty()


def test_file_is_removed_once_empty(tmp_path):
    path = state_path(str(tmp_path), "p", "/run/y.sock")
    r = SavedRings(path, 2)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    r.claim(0, ID)
    r.close(remove=r.empty())
    assert os.path.exists(path)                             # a claimed ring is kept
    r = SavedRings(path, 2)
    r.forget(0)
    r.close(remove=r.empty())
    assert not os.path.exists(path)


def _position(flags_at_first: int | None, used, batch, num=256):
    mem = SimpleNamespace(pread=lambda uva, n: None if flags_at_first is None else flags_at_first.to_bytes(2, "little"))
    fake = SimpleNamespace(device=SimpleNamespace(mem=mem))
    v = Vring(0, num=num, addr=SimpleNamespace(desc=0x7000_0000))
    return Session._packed_position(fake, v, used, batch)


FIRST, AFTER = 5 | 1 << 15, 9 | 1 << 15          # a batch of slots 5..8 in lap "wrap 1"


@pytest.mark.parametrize("flags, want", [
    (AVAIL, FIRST),             # still the driver's available descriptor: never published
    (AVAIL | USED, AFTER),      # published (used, wrap 1)
    (USED, AFTER),              # published, taken and made available again for the next lap
    (0, AFTER),                 # published, used in the next lap already
])
def test_resume_position_follows_the_batch_flag(flags, want):
    assert _position(flags, 0x8001, FIRST | AFTER << 16) == want


def test_resume_position_without_a_batch_or_with_nonsense():
    assert _position(AVAIL, 0x8003, 0) == 0x8003             # no batch since claimed: the published one
    assert _position(AVAIL, None, 0) is None                 # torn and no batch
    assert _position(None, 0x8001, FIRST | AFTER << 16) is None   # descriptor not readable
    assert _position(AVAIL, 0x8001, (300 | 1 << 15) | AFTER << 16) is None   # slot beyond the ring
    assert _position(AVAIL | USED, 0x8001, FIRST | (300 | 1 << 15) << 16, num=256) is None
