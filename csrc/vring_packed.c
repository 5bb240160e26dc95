/*
 * vring_packed.c — device side of the packed virtqueue (virtio 1.1 §2.7), a
 * sibling of vring_split.c behind the same struct vr_ring_ops.
 *
 * Owns: mapping the descriptor ring and the two event suppression structures
 * (driver area = SET_VRING_ADDR's avail address, device area = its used address),
 * popping an available chain (direct, or one indirect table, §2.7.5), writing used
 * descriptors back in place (§2.7.8), event suppression in both directions
 * (ENABLE / DISABLE / DESC with EVENT_IDX, §2.7.10, §2.7.14), and the vhost-user
 * SET/GET_VRING_BASE encoding of the positions and wrap counters. With the
 * dirty log on, every descriptor written back and every device-area write is
 * marked (vr_log_write / vr_log_used, vhost-user "Migration").
 *
 * Positions are slots 0..num-1 plus a wrap counter (num need not be a power of
 * two). A descriptor is available when its AVAIL bit equals our avail wrap counter
 * and its USED bit does not; a used descriptor has both bits equal to the used
 * wrap counter.
 *
 * The guest is hostile. What pop() checks, and what it decided (the same rules as
 * vring_split.c wherever the layouts agree):
 *  - a chain occupies at most `num` slots (a longer one wraps onto itself).
 *  - indirect (§2.7.5): only with VIRTIO_RING_F_INDIRECT_DESC; the indirect
 *    descriptor stands alone (no NEXT, not inside a chain); len a nonzero
 *    multiple of 16 and at most num entries; no INDIRECT inside a table; the table
 *    must be contiguous in one region, so one crossing a boundary is rejected,
 *    and 16-byte aligned.
 *  - readable descriptors come before writable ones.
 *  - buffer ranges go through vr_gather(): crossing regions is split into one
 *    iovec per region; an unmapped byte or a wrapping range is VR_BROKEN_ADDR.
 *  - zero-length descriptors are accepted and add no iovec (no byte is accessed);
 *    a chain with no bytes at all is malformed (VR_BROKEN_DESC).
 *  - only the head's AVAIL/USED bits decide availability (the driver flips the
 *    head last, §2.7.6); the following descriptors of a chain are read as they are.
 *  - a chain shorter than the vnet header is dropped and counted by net_tx.c.
 *  - every guest-shared field (flags, addr, len, id, driver event area) is read
 *    exactly once into a local with vr_ld16/32/64 (READ_ONCE-style loads).
 * A violation marks the vq broken (counted, logged once by the control plane);
 * SET_VRING_BASE or a new frontend makes it healthy again.
 */
#include <errno.h>
#include <stdint.h>

#include "vr_internal.h"

#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
#define VRING_PACKED_EVENT_FLAG_ENABLE 0
#define VRING_PACKED_EVENT_FLAG_DISABLE 1
#define VRING_PACKED_EVENT_FLAG_DESC 2
#define VRING_PACKED_EVENT_WRAP (1u << 15)

struct vring_packed_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

struct vring_packed_event {
    uint16_t off_wrap;                  /* bits 0-14 slot, bit 15 wrap counter */
    uint16_t flags;                     /* ENABLE / DISABLE / DESC */
};

_Static_assert(sizeof(struct vring_packed_desc) == 16, "packed desc layout");
_Static_assert(sizeof(struct vring_packed_event) == 4, "packed event layout");

/* Packed positions as vr_chain.pos and the vhost-user base carry them. */
static inline uint32_t vr_pos(uint16_t slot, bool wrap)
{
    return slot | (uint32_t)wrap << 15;
}

static inline bool vr_desc_avail(uint16_t flags, bool wrap)
{
    return !!(flags & VRING_PACKED_DESC_F_AVAIL) == wrap &&
           !!(flags & VRING_PACKED_DESC_F_USED) != wrap;
}

static inline void vr_slot_next(uint16_t *slot, bool *wrap, uint32_t num)
{
    if (++*slot == num) {
        *slot = 0;
        *wrap = !*wrap;
    }
}

static int vr_packed_map(const struct vr_mem *mem, struct vr_vq *vq)
{
    void *d, *drv, *dev;

    vq->mapped = false;
    vq->pdesc = NULL;
    vq->driver_event = NULL;
    vq->device_event = NULL;
    if (!vq->addr_set || !vq->num)
        return 0;                       /* nothing to map yet: not an error */
    if (vq->last_avail_idx >= vq->num || vq->used_idx >= vq->num)
        return -EINVAL;                 /* a base set for a larger ring */
    d = vr_map_ring_part(mem, vq->desc_uva, 16ull * vq->num, 16);
    drv = vr_map_ring_part(mem, vq->avail_uva, sizeof(struct vring_packed_event), 4);
    dev = vr_map_ring_part(mem, vq->used_uva, sizeof(struct vring_packed_event), 4);
    if (!d || !drv || !dev)
        return -EFAULT;
    vq->pdesc = d;
    vq->driver_event = drv;
    vq->device_event = dev;
    vq->desc_gpa = vr_uva_to_gpa(mem, vq->desc_uva);
    vq->used_gpa = vr_uva_to_gpa(mem, vq->used_uva);
    vq->device_event_flags = 0xffff;    /* unknown: the next notify change writes */
    vq->mapped = true;
    return 0;
}

/*
 * vhost-user spec, "Vring descriptor indices for packed virtqueues": bits 0-14
 * next avail slot, bit 15 avail wrap counter, bits 16-30 next used slot, bit 31
 * used wrap counter (QEMU 7.2 sends and expects both halves). DPDK 22.11 sends and
 * reads only the low half and restarts used at avail: a zero high half means that.
 * A net device has nothing in flight when stopped, so both halves agree anyway.
 */
static int vr_packed_set_base(struct vr_vq *vq, uint32_t base)
{
    uint16_t avail = base & 0x7fff, used = (base >> 16) & 0x7fff;
    bool aw = (base >> 15) & 1, uw = (base >> 31) & 1;

    if ((base >> 16) == 0) {
        used = avail;
        uw = aw;
    }
    if (vq->num && (avail >= vq->num || used >= vq->num))
        return -EINVAL;
    /* The frontend re-initialises the ring: a ring it broke may run again. */
    vq->stats.broken_detail = 0;
    __atomic_store_n(&vq->stats.broken, VR_BROKEN_NONE, __ATOMIC_RELEASE);
    vq->last_avail_idx = avail;
    vq->avail_wrap = aw;
    vq->used_idx = used;
    vq->used_wrap = uw;
    vq->used_pending = false;
    vq->signalled_valid = false;
    vq->used_since_signal = 0;
    return 0;
}

static uint32_t vr_packed_get_base(const struct vr_vq *vq)
{
    return vr_pos(vq->last_avail_idx, vq->avail_wrap) |
           vr_pos(vq->used_idx, vq->used_wrap) << 16;
}

/* §2.7.1: both wrap counters start at 1. */
static void vr_packed_init_state(struct vr_vq *vq)
{
    vr_packed_set_base(vq, vr_pos(0, true) | vr_pos(0, true) << 16);
}

/* Reads the fields after flags of one descriptor into a local, each exactly once. */
static inline void vr_read_pdesc(const volatile struct vring_packed_desc *p,
                                 struct vring_packed_desc *d)
{
    d->addr = vr_ld64(&p->addr);
    d->len = vr_ld32(&p->len);
    d->id = vr_ld16(&p->id);
}

/* Appends one buffer to the chain: 0, a VR_BROKEN_* reason (> 0) or VR_POP_NOSPACE. */
static inline int vr_add_buf(struct vr_qp *qp, const struct vring_packed_desc *d, bool write,
                             struct iovec *iov, uint64_t *gpa, unsigned max_iov, struct vr_chain *c)
{
    int r;

    if (write) {
        c->in_len += d->len;
    } else {
        if (c->niov != c->nout)         /* readable after writable */
            return VR_BROKEN_DESC;
        c->out_len += d->len;
    }
    r = vr_gather(qp->mem, &qp->xlate_hint, d->addr, d->len, iov, gpa, &c->niov, max_iov);
    if (r == -ENOBUFS)
        return VR_POP_NOSPACE;
    if (r)
        return VR_BROKEN_ADDR;
    if (!write)
        c->nout = c->niov;
    return 0;
}

/* The buffers of one indirect table (§2.7.5: sequential, only WRITE is meaningful). */
static int vr_walk_indirect(struct vr_qp *qp, struct vr_vq *vq, const struct vring_packed_desc *d,
                            struct iovec *iov, uint64_t *gpa, unsigned max_iov, struct vr_chain *c)
{
    const volatile struct vring_packed_desc *table;
    uint64_t l = d->len;
    uint32_t n;
    int r;

    if (!vr_has_feature(qp, VR_F_INDIRECT_DESC))
        return VR_BROKEN_DESC;
    if (d->len == 0 || (d->len % 16) || d->len / 16 > vq->num)
        return VR_BROKEN_INDIRECT;
    table = vr_xlate_gpa(qp->mem, &qp->xlate_hint, d->addr, &l);
    if (!table)
        return VR_BROKEN_ADDR;
    /* contiguous in one region, and 16-byte aligned like the descriptor ring */
    if (l < d->len || ((uintptr_t)table & 15))
        return VR_BROKEN_INDIRECT;
    n = d->len / 16;
    for (uint32_t k = 0; k < n; k++) {
        struct vring_packed_desc e;
        uint16_t fl = vr_ld16(&table[k].flags);

        vr_read_pdesc(&table[k], &e);
        if (fl & VRING_DESC_F_INDIRECT)
            return VR_BROKEN_INDIRECT;  /* no nesting */
        r = vr_add_buf(qp, &e, fl & VRING_DESC_F_WRITE, iov, gpa, max_iov, c);
        if (r)
            return r == VR_BROKEN_DESC ? VR_BROKEN_INDIRECT : r;
    }
    return 0;
}

/*
 * Pops the next available chain (same contract as the split ring's pop). The
 * buffer id comes from the chain's last descriptor (§2.7.6); an indirect
 * descriptor must stand alone (no NEXT, not inside a chain).
 */
static int vr_packed_pop(struct vr_qp *qp, struct vr_vq *vq, struct iovec *iov, uint64_t *gpa,
                         unsigned max_iov, struct vr_chain *c)
{
    const uint32_t num = vq->num;
    uint16_t slot = vq->last_avail_idx, flags;
    bool wrap = vq->avail_wrap;
    int r = 0;

    flags = vr_ld16(&vq->pdesc[slot].flags);
    if (!vr_desc_avail(flags, wrap))
        return 0;
    /* acquire: the descriptor bodies were written before the head's flags. */
    vr_acquire_after_avail_idx();

    c->head = 0xffff;                   /* set from the chain's last descriptor */
    c->pos = vr_pos(slot, wrap);
    c->ndesc = 0;
    c->niov = c->nout = 0;
    c->out_len = c->in_len = 0;
    for (;;) {
        struct vring_packed_desc d;

        if (c->ndesc == num) {          /* longer than the ring: the driver lies */
            r = VR_BROKEN_DESC;
            break;
        }
        if (c->ndesc)
            flags = vr_ld16(&vq->pdesc[slot].flags);
        vr_read_pdesc(&vq->pdesc[slot], &d);
        if (c->ndesc == 0)
            c->head = d.id;             /* provisional, for the broken detail */
        c->ndesc++;
        if (flags & VRING_DESC_F_INDIRECT) {
            if (c->ndesc != 1 || (flags & VRING_DESC_F_NEXT)) {
                r = vr_has_feature(qp, VR_F_INDIRECT_DESC) ? VR_BROKEN_INDIRECT : VR_BROKEN_DESC;
                break;
            }
            r = vr_walk_indirect(qp, vq, &d, iov, gpa, max_iov, c);
        } else {
            r = vr_add_buf(qp, &d, flags & VRING_DESC_F_WRITE, iov, gpa, max_iov, c);
        }
        if (r)
            break;
        vr_slot_next(&slot, &wrap, num);
        if (!(flags & VRING_DESC_F_NEXT)) {
            c->head = d.id;
            break;
        }
    }
    if (r == VR_POP_NOSPACE)
        return VR_POP_NOSPACE;
    if (!r && c->out_len + c->in_len == 0)
        r = VR_BROKEN_DESC;             /* nothing to read or write: malformed */
    if (r) {
        vr_vq_set_broken(qp, vq, (uint32_t)r, c->head);
        return VR_POP_BROKEN;
    }
    vq->last_avail_idx = slot;
    vq->avail_wrap = wrap;
    return 1;
}

/* Gives back chain c and every chain popped after it. */
static void vr_packed_rewind(struct vr_vq *vq, const struct vr_chain *c)
{
    vq->last_avail_idx = c->pos & 0x7fff;
    vq->avail_wrap = (c->pos >> 15) & 1;
}

/*
 * Writes a used descriptor at the next used slot: id and len first, flags last.
 * The batch's first descriptor gets its flags only at flush, so the driver sees
 * the whole batch at once; later ones are flagged right away (the driver cannot
 * reach them before the first).
 */
static void vr_packed_push(struct vr_qp *qp, struct vr_vq *vq, const struct vr_chain *c, uint32_t len)
{
    volatile struct vring_packed_desc *d = &vq->pdesc[vq->used_idx];
    uint16_t flags = vq->used_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;

    if (c->niov != c->nout)
        flags |= VRING_DESC_F_WRITE;    /* len is meaningful (§2.7.8) */
    d->id = c->head;
    d->len = len;
    if (!vq->used_pending) {
        vq->used_pending = true;
        vq->pending_slot = vq->used_idx;
        vq->pending_flags = flags;
    } else {
        /* release: id/len (and the buffer contents) before the flags that publish them. */
        vr_release_before_used_idx();
        vr_st16(&d->flags, flags);
    }
    /* The whole descriptor is logged now; the batch's first gets its flags at flush,
     * before the burst's marks reach the log (vr_log_flush). */
    if (qp->log_on)
        vr_log_write(qp, vq->desc_gpa + 16ull * vq->used_idx, 16);
    vq->used_since_signal += c->ndesc;
    vq->used_idx += c->ndesc;           /* ndesc <= num, so one wrap at most */
    if (vq->used_idx >= vq->num) {
        vq->used_idx -= vq->num;
        vq->used_wrap = !vq->used_wrap;
    }
}

/*
 * Did the used slots written since the last call decision pass the driver's event
 * slot? Positions are linearized around the current lap: the event is in this lap
 * if its wrap bit equals our used wrap counter, else in the previous one.
 */
static bool vr_packed_need_event(const struct vr_vq *vq, uint16_t off_wrap)
{
    int32_t now = vq->used_idx, before = now - (int32_t)vq->used_since_signal;
    int32_t ev = off_wrap & 0x7fff;

    if (!!(off_wrap & VRING_PACKED_EVENT_WRAP) != vq->used_wrap)
        ev -= (int32_t)vq->num;
    return ev >= before && ev < now;
}

static void vr_packed_flush(struct vr_qp *qp, struct vr_vq *vq)
{
    uint16_t ev_flags;
    bool need;

    if (!vq->used_pending)
        return;
    /* For a restarted daemon: where this batch starts and ends, before its flag
     * (struct vr_vq_saved, csrc/vhostd.h). */
    if (vq->saved)
        __atomic_store_n(&vq->saved->batch,
                         vr_pos(vq->pending_slot, !!(vq->pending_flags & VRING_PACKED_DESC_F_AVAIL)) |
                         vr_pos(vq->used_idx, vq->used_wrap) << 16, __ATOMIC_RELAXED);
    /* release: every id/len of the batch (and the batch record) before the first
     * descriptor's flags. */
    vr_release_before_used_idx();
    vr_st16(&vq->pdesc[vq->pending_slot].flags, vq->pending_flags);
    /* Marked again after this store: push() marked it before the flags were written,
     * and a full log cache may have reached the log in between. */
    if (qp->log_on)
        vr_log_write(qp, vq->desc_gpa + 16ull * vq->pending_slot, 16);
    vq->used_pending = false;
    /* seq_cst: the flags store must be ordered before reading the driver's event area. */
    vr_full_fence();

    ev_flags = vr_ld16(&vq->driver_event->flags);
    if (ev_flags == VRING_PACKED_EVENT_FLAG_DESC && vr_has_feature(qp, VR_F_EVENT_IDX)) {
        uint16_t off_wrap = vr_ld16(&vq->driver_event->off_wrap);

        need = !vq->signalled_valid || vq->used_since_signal >= vq->num ||
               vr_packed_need_event(vq, off_wrap);
    } else {
        need = ev_flags != VRING_PACKED_EVENT_FLAG_DISABLE;
    }
    vq->signalled_valid = true;
    vq->used_since_signal = 0;

    if (!need)
        vq->stats.calls_suppressed++;
    else
        vr_vq_call(qp, vq);
}

static inline void vr_set_device_event(struct vr_qp *qp, struct vr_vq *vq, uint16_t flags)
{
    if (vq->device_event_flags != flags) {
        vr_st16(&vq->device_event->flags, flags);
        vr_log_used(qp, vq, 2, 2);
        vq->device_event_flags = flags;
    }
}

/* Ask the driver not to kick while we drain (§2.7.10). */
static void vr_packed_disable_notify(struct vr_qp *qp, struct vr_vq *vq)
{
    vr_set_device_event(qp, vq, VRING_PACKED_EVENT_FLAG_DISABLE);
}

/*
 * Ask for a kick at the next available descriptor (DESC mode with EVENT_IDX,
 * else ENABLE), then re-check that descriptor once. True if it is available
 * after all (caller keeps draining).
 */
static bool vr_packed_enable_notify(struct vr_qp *qp, struct vr_vq *vq)
{
    if (vr_has_feature(qp, VR_F_EVENT_IDX)) {
        vr_st16(&vq->device_event->off_wrap, (uint16_t)vr_pos(vq->last_avail_idx, vq->avail_wrap));
        /* release: off_wrap is in place before the flags that make the driver read it. */
        vr_release_before_used_idx();
        vr_st16(&vq->device_event->flags, VRING_PACKED_EVENT_FLAG_DESC);
        vr_log_used(qp, vq, 0, 4);
        vq->device_event_flags = VRING_PACKED_EVENT_FLAG_DESC;
    } else {
        vr_set_device_event(qp, vq, VRING_PACKED_EVENT_FLAG_ENABLE);
    }
    /* seq_cst: the request must be visible before we re-read the descriptor flags. */
    vr_full_fence();
    return vr_desc_avail(vr_ld16(&vq->pdesc[vq->last_avail_idx].flags), vq->avail_wrap);
}

const struct vr_ring_ops vr_packed_ops = {
    .map = vr_packed_map,
    .pop = vr_packed_pop,
    .rewind = vr_packed_rewind,
    .push = vr_packed_push,
    .flush = vr_packed_flush,
    .disable_notify = vr_packed_disable_notify,
    .enable_notify = vr_packed_enable_notify,
    .set_base = vr_packed_set_base,
    .get_base = vr_packed_get_base,
    .init_state = vr_packed_init_state,
};
