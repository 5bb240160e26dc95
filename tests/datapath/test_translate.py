"""Guest address translation (csrc/guest_mem.c: vr_translate, vr_mem_validate)
called directly through cffi on hand-built region tables: region edges and
holes, the top of the address space, GPA and UVA spaces, zero-size regions,
a garbage region count, overlapping and wrapping regions.
"""

from __future__ import annotations

from vhostd._native import ffi, lib

from tests.datapath.harness import M1


# ---------------------------------------------------------------- translation

def _table(regions):
    m = ffi.new("struct vr_mem *")
    m.nregions = len(regions)
    for i, (gpa, uva, size, hva) in enumerate(regions):
        r = m.regions[i]
        r.gpa, r.uva, r.size, r.hva = gpa, uva, size, hva
    return m


def xlate(m, addr, ln, space=None):
    space = lib.VR_SPACE_GPA if space is None else space
    p = ffi.new("uint64_t *", ln)
    r = lib.vr_translate(m, space, addr, p)
    return (None if r == ffi.NULL else int(ffi.cast("uintptr_t", r))), p[0]


TOP = 2**64


def test_translate_edges():
    m = _table([(0, 0x10_0000_0000, M1, 0x1000_0000),
                (M1, 0x10_0010_0000, M1, 0x2000_0000),
                (1 << 32, 0x20_0000_0000, M1, 0x3000_0000),
                (TOP - 0x1000, 0x30_0000_0000, 0x1000, 0x4000_0000)])
    assert xlate(m, 0, 16) == (0x1000_0000, 16)
    assert xlate(m, M1 - 1, 16) == (0x1000_0000 + M1 - 1, 1)      # clamped at region end
    assert xlate(m, M1, 16) == (0x2000_0000, 16)                     # next region
    assert xlate(m, 2 * M1, 1)[0] is None                            # hole
    assert xlate(m, (1 << 32) - 1, 1)[0] is None
    assert xlate(m, (1 << 32) + M1 - 1, TOP - 1) == (0x3000_0000 + M1 - 1, 1)
    assert xlate(m, 5, 0) == (0x1000_0000 + 5, 0)                    # len 0
    assert xlate(m, TOP - 1, TOP - 1) == (0x4000_0000 + 0xfff, 1)    # top of address space
    assert xlate(m, TOP - 0x1000, TOP - 1) == (0x4000_0000, 0x1000)
    assert xlate(m, TOP - 0x1001, 2)[0] is None
    # uva space
    assert xlate(m, 0x10_0010_0008, 8, lib.VR_SPACE_UVA) == (0x2000_0008, 8)
    assert xlate(m, 0x8, 8, lib.VR_SPACE_UVA)[0] is None
    assert xlate(m, 0, 8, 7)[0] is None                               # bad space
    # spanning two regions: the caller loops on the clamped length
    addr, left, pieces = M1 - 100, 300, []
    while left:
        p, n = xlate(m, addr, left)
        assert p is not None
        pieces.append((p, n))
        addr += n
        left -= n
    assert pieces == [(0x1000_0000 + M1 - 100, 100), (0x2000_0000, 200)]


def test_translate_zero_size_and_nregions_clamp():
    m = _table([(0, 0, 0, 0x1000), (0x1000, 0x1000, 0x1000, 0x5000)])
    assert xlate(m, 0, 8)[0] is None
    assert xlate(m, 0x1000, 8) == (0x5000, 8)
    m.nregions = 1000                 # garbage count: clamped, no overrun
    assert xlate(m, 0x1000, 8) == (0x5000, 8)


def test_mem_validate():
    ok = [(0, 0x1000, M1, 0x1000_0000), (M1, 0x10_0000, M1, 0x2000_0000)]
    assert lib.vr_mem_validate(_table(ok)) == 0
    assert lib.vr_mem_validate(_table([(0, 0, 0, 0x1000)])) < 0                  # size 0
    assert lib.vr_mem_validate(_table([(0, 0, M1, 0), (M1 // 2, M1, M1, 0x1000)])) < 0  # overlap
    assert lib.vr_mem_validate(_table([(TOP - 0x1000, 0, 0x2000, 0x1000)])) < 0  # gpa wraps
    assert lib.vr_mem_validate(_table([(0, TOP - 0x10, 0x1000, 0x1000)])) < 0    # uva wraps
    assert lib.vr_mem_validate(_table([(0, 0, 0x1000, TOP - 0x10)])) < 0         # hva wraps
    m = _table(ok)
    m.nregions = lib.VR_MAX_REGIONS + 1
    assert lib.vr_mem_validate(m) < 0
