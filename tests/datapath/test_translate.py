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
    m.nregions = 1000                 # garbage count: clamped to the table, no overrun;
    # the zeroed entries beyond make the table unsorted, so a lookup may miss
    # (vr_mem_validate refuses such a table), but never lands elsewhere
    assert xlate(m, 0x1000, 8) in ((0x5000, 8), (None, 8))


def test_translate_hundreds_of_regions_matches_a_model():
    """VR_MAX_REGIONS regions of random sizes with random holes (sorted, as the
    control plane fills the table): every lookup agrees with a linear model,
    at region starts, ends, holes and random addresses."""
    import random
    rnd = random.Random(7)
    regions, gpa = [], 0
    for i in range(lib.VR_MAX_REGIONS):
        gpa += rnd.choice((0, 0x1000, 0x200000))        # adjacent or a hole
        size = rnd.choice((0x1000, 0x2000, 0x10000, M1))
        regions.append((gpa, 0x7F00_0000_0000 + gpa, size, 0x1000_0000 + 0x100 * i * M1))
        gpa += size
    m = _table(regions)
    assert lib.vr_mem_validate(m) == 0

    def model(addr):
        for g, _u, sz, h in regions:
            if g <= addr < g + sz:
                return h + addr - g, min(8, g + sz - addr)
        return None, 8
    probes = [g + d for g, _u, sz, _h in regions for d in (0, sz - 1, sz, -1)]
    probes += [rnd.randrange(0, gpa + M1) for _ in range(2000)]
    for addr in probes:
        if addr >= 0:
            assert xlate(m, addr, 8) == model(addr), hex(addr)


def test_mem_validate_wants_gpa_order():
    a, b = (0, 0x1000, M1, 0x1000_0000), (2 * M1, 0x10_0000, M1, 0x2000_0000)
    assert lib.vr_mem_validate(_table([a, b])) == 0
    assert lib.vr_mem_validate(_table([b, a])) < 0                  # unsorted
    assert lib.vr_mem_validate(_table([a, a])) < 0                  # duplicate


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
