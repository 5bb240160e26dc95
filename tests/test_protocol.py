"""protocol.py: header and payload pack/unpack with exact-size and overflow checks."""
import struct

import pytest

from vhostd.errors import ProtocolError
from vhostd.protocol import (
    HEADER,
    MAX_PAYLOAD,
    Header,
    MemRegion,
    Request,
    VringAddr,
    VringFile,
    VringState,
    pack_mem_table,
    pack_message,
    unpack_empty,
    unpack_mem_table,
    unpack_single_region,
    unpack_u64,
)


def test_header_roundtrip_and_flags():
    h = Header.unpack(HEADER.pack(Request.SET_VRING_NUM, 0x1 | 0x8, 8))
    assert (h.request, h.size, h.need_reply) == (Request.SET_VRING_NUM, 8, True)
    assert not Header.unpack(HEADER.pack(1, 0x1, 0)).need_reply


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8])
def test_header_rejects_other_versions(flags):
    with pytest.raises(ProtocolError, match="version"):
        Header.unpack(HEADER.pack(1, flags, 0))


def test_header_rejects_huge_payload():
    with pytest.raises(ProtocolError, match="exceeds"):
        Header.unpack(HEADER.pack(5, 1, MAX_PAYLOAD + 1))


def test_reply_message_sets_reply_flag():
    msg = pack_message(Request.GET_FEATURES, struct.pack("=Q", 7))
    req, flags, size = HEADER.unpack_from(msg)
    assert (req, flags, size) == (1, 0x5, 8)


@pytest.mark.parametrize("payload", [b"", b"\0" * 7, b"\0" * 9])
def test_u64_exact_size(payload):
    with pytest.raises(ProtocolError):
        unpack_u64(payload)


def test_vring_state_and_addr_exact_sizes():
    assert VringState.unpack(struct.pack("=II", 3, 256)) == VringState(3, 256)
    with pytest.raises(ProtocolError):
        VringState.unpack(b"\0" * 12)
    addr = VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert VringAddr.unpack(addr.pack()) == addr
    # layout: index, flags, desc, used, avail, log
    assert addr.pack() == struct.pack("=IIQQQQ", 1, 0, 0x1000, 0x3000, 0x2000, 0)
    with pytest.raises(ProtocolError):
        VringAddr.unpack(addr.pack()[:-1])


def test_vring_file_bits():
    f = VringFile.unpack(struct.pack("=Q", 0x103))
    assert (f.index, f.nofd) == (3, True)
    assert VringFile.unpack(struct.pack("=Q", 0x1)).nofd is False


def region(gpa=0, size=0x100000, uva=0x7F0000000000, off=0):
    return MemRegion(gpa, size, uva, off)


def test_mem_table_qemu_and_dpdk_sizes():
    regs = [region(), region(gpa=0x100000000, uva=0x7F1000000000)]
    dpdk_style = pack_mem_table(regs)
    assert unpack_mem_table(dpdk_style) == regs
    qemu_style = dpdk_style + b"\0" * 32 * 6  # QEMU always sends room for 8 regions
    assert unpack_mem_table(qemu_style) == regs
    with pytest.raises(ProtocolError):
        unpack_mem_table(dpdk_style + b"\0" * 32)


@pytest.mark.parametrize("n", [0, 9, 0xFFFFFFFF])
def test_mem_table_region_count_bounded(n):
    with pytest.raises(ProtocolError, match="regions"):
        unpack_mem_table(struct.pack("=II", n, 0) + b"\0" * 32 * 8)


@pytest.mark.parametrize(
    "bad",
    [
        region(size=0),
        region(gpa=0xFFFFFFFFFFFFF000, size=0x2000),
        region(uva=0xFFFFFFFFFFFFFFFF, size=2),
        region(off=0xFFFFFFFFFFFFFFFF, size=0x10),
    ],
)
def test_mem_region_overflow_rejected(bad):
    with pytest.raises(ProtocolError):
        unpack_mem_table(pack_mem_table([bad]))


def test_single_region():
    r = region()
    assert unpack_single_region(b"\0" * 8 + r.pack()) == r
    with pytest.raises(ProtocolError):
        unpack_single_region(r.pack())


def test_empty_payload():
    assert unpack_empty(b"") is None
    unpack_empty(b"\0" * 8)  # QEMU sends SET_OWNER with an unused u64 in some versions
    with pytest.raises(ProtocolError):
        unpack_empty(b"\0" * 4)


def test_vring_file_reserved_bits_refused_not_fatal():
    from vhostd.errors import RequestError

    with pytest.raises(RequestError, match="reserved bits"):
        VringFile.unpack(struct.pack("=Q", 0x200))
    assert VringFile.unpack(struct.pack("=Q", 0x1FF)) == VringFile(0xFF, True, 0x1FF)
