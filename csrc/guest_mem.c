/*
 * guest_mem.c — guest memory: mapping helpers, region-table validation and the
 * exported copy of the one translation function (vr_xlate in vr_internal.h).
 *
 * vhost-user spec, SET_MEM_TABLE / ADD_MEM_REG: each region is described by its
 * guest physical address, the frontend's virtual address (used by SET_VRING_ADDR)
 * and a size; we map the fd and record our own address (hva). The control plane
 * owns the mappings; the datapath only translates through the table.
 *
 * A table is valid when every region is non-empty, no gpa/uva/hva range wraps
 * 2^64, and no two regions overlap in guest-physical space (memory.py checks
 * that and frontend-virtual overlaps before mapping; this is the last word, on
 * the exact table C will translate through). vr_xlate() (vr_internal.h) never forms
 * addr + len, so no input overflows; a range crossing regions is translated
 * piecewise by vr_gather().
 */
#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/vfs.h>

#include "vr_internal.h"

int vr_mmap(int fd, uint64_t len, uint64_t *addr)
{
    void *p;

    if (!addr || fd < 0 || len == 0 || len > (uint64_t)SIZE_MAX)
        return -EINVAL;
    p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    *addr = (uint64_t)(uintptr_t)p;
    return 0;
}

int vr_fd_fs_type(int fd, uint64_t *type)
{
    struct statfs sfs;

    if (!type || fd < 0)
        return -EINVAL;
    if (fstatfs(fd, &sfs) < 0)
        return -errno;
    *type = (uint64_t)(unsigned long)sfs.f_type;
    return 0;
}

int vr_munmap(uint64_t addr, uint64_t len)
{
    if (addr == 0 || len == 0 || len > (uint64_t)SIZE_MAX)
        return -EINVAL;
    if (munmap((void *)(uintptr_t)addr, (size_t)len) < 0)
        return -errno;
    return 0;
}

void *vr_translate(const struct vr_mem *mem, int space, uint64_t addr, uint64_t *len)
{
    if (!mem || !len || (space != VR_SPACE_GPA && space != VR_SPACE_UVA))
        return NULL;
    return vr_xlate(mem, space, addr, len);
}

/* True if base + size - 1 does not wrap (size > 0). */
static inline bool vr_range_ok(uint64_t base, uint64_t size)
{
    return size && base + (size - 1) >= base;
}

/* Do [a, a+as) and [b, b+bs) share a byte? Both ranges already checked not to wrap,
 * so the inclusive ends cannot overflow. */
static inline bool vr_overlap(uint64_t a, uint64_t as, uint64_t b, uint64_t bs)
{
    return a <= b + (bs - 1) && b <= a + (as - 1);
}

int vr_mem_validate(const struct vr_mem *mem)
{
    if (!mem || mem->nregions > VR_MAX_REGIONS)
        return -EINVAL;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vr_region *r = &mem->regions[i];

        if (!vr_range_ok(r->gpa, r->size) || !vr_range_ok(r->uva, r->size) ||
            !vr_range_ok(r->hva, r->size) || r->hva == 0)
            return -EINVAL;
        if (i > 0) {
            const struct vr_region *o = &mem->regions[i - 1];

            /* Sorted by gpa (the datapath binary-searches), and, sorted, a gpa
             * overlap can only be with the previous region. An overlap would make
             * descriptor translation ambiguous. (memory.py also refuses uva
             * overlaps, which only SET_VRING_ADDR translation sees.) */
            if (r->gpa <= o->gpa || vr_overlap(r->gpa, r->size, o->gpa, o->size))
                return -EINVAL;
        }
    }
    return 0;
}
