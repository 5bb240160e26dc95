/*
 * vring_split.c — device side of the split virtqueue (virtio 1.1 §2.6).
 *
 * Owns: mapping the three ring parts, popping an available chain into iovecs
 * (direct and indirect descriptors, §2.6.5), returning used elements (§2.6.8),
 * and notification suppression in both directions (§2.6.7, §2.6.10, EVENT_IDX).
 * Every write to the used ring (elements, idx, flags, avail_event) is marked in
 * the dirty log when logging is on (vr_log_used, vhost-user "Migration").
 *
 * Everything here runs on the worker thread except map, set_base and init_state,
 * which the control plane reaches (through vr_split_ops) while the worker is parked.
 *
 * The guest is hostile. What pop() checks, and what it decided:
 *  - avail->idx may run at most `num` entries ahead of last_avail_idx (§2.6.6);
 *    further is VR_BROKEN_AVAIL_IDX.
 *  - head and every `next` must be < the size of the table they index (queue
 *    size, or the indirect table's entry count).
 *  - a chain walk is bounded by the table size: a longer walk is a loop.
 *  - indirect (§2.6.5.3): only with VIRTIO_RING_F_INDIRECT_DESC; len a nonzero
 *    multiple of 16 and at most num entries; no NEXT on the indirect descriptor,
 *    no INDIRECT inside a table (no nesting); the table must be contiguous in one
 *    region (we index it as an array), so one crossing a region boundary is
 *    rejected, and 16-byte aligned like the descriptor table.
 *  - readable descriptors come before writable ones (§2.6.4.2).
 *  - buffer ranges go through vr_gather(): a range crossing regions is split into
 *    one iovec per region (guests lay out RAM in several regions and Linux places
 *    buffers anywhere); any unmapped byte or a range that wraps 2^64 is
 *    VR_BROKEN_ADDR.
 *  - zero-length descriptors are accepted and contribute no iovec (no byte of
 *    them is accessed, so their address is not translated; the walk budget still
 *    counts them). A chain with no bytes at all is malformed (VR_BROKEN_DESC): an
 *    empty RX chain would otherwise be handed to readv() as zero iovecs.
 *  - a chain shorter than the vnet header is not a ring error: net_tx.c drops and
 *    counts it (drop_bad_hdr), net_rx.c cannot fill it (drop_ring_full).
 *  - guest-shared fields are read exactly once into locals with vr_ld16/32/64
 *    (READ_ONCE-style relaxed atomic loads): avail->idx, the avail ring entry,
 *    each descriptor's addr/len/flags/next, used_event, avail->flags.
 * A violation marks the vq broken (counted once, logged once by the control
 * plane, err eventfd signalled); the worker then stops servicing it. Both vqs of
 * the pair keep their own state: the other one keeps working. SET_VRING_BASE
 * (the frontend re-initialising the ring after GET_VRING_BASE) or a new frontend
 * (vr_qp_reset_vq) makes it healthy again.
 */
#include <errno.h>
#include <stdint.h>

#include "vr_internal.h"

static int vr_split_map(const struct vr_mem *mem, struct vr_vq *vq)
{
    void *d, *a, *u;

    vq->mapped = false;
    vq->desc = NULL;
    vq->avail = NULL;
    vq->used = NULL;
    if (!vq->addr_set || !vq->num)
        return 0;                       /* nothing to map yet: not an error */
    if (vq->num & (vq->num - 1))
        return -EINVAL;                 /* §2.6: split queue sizes are powers of two */
    d = vr_map_ring_part(mem, vq->desc_uva, vr_desc_bytes(vq->num), 16);
    a = vr_map_ring_part(mem, vq->avail_uva, vr_avail_bytes(vq->num), 2);
    u = vr_map_ring_part(mem, vq->used_uva, vr_used_bytes(vq->num), 4);
    if (!d || !a || !u)
        return -EFAULT;
    vq->desc = d;
    vq->avail = a;
    vq->used = u;
    vq->used_gpa = vr_uva_to_gpa(mem, vq->used_uva);
    vq->mapped = true;
    return 0;
}

/* vhost-user SET_VRING_BASE for split rings: bits 0-15 are the next avail index
 * (free-running); the used index restarts there too (nothing is in flight). */
static int vr_split_set_base(struct vr_vq *vq, uint32_t base)
{
    if (base > 0xffff)
        return -EINVAL;
    /* The frontend re-initialises the ring: a ring it broke may run again. */
    vq->stats.broken_detail = 0;
    __atomic_store_n(&vq->stats.broken, VR_BROKEN_NONE, __ATOMIC_RELEASE);
    vq->last_avail_idx = (uint16_t)base;
    vq->used_idx = (uint16_t)base;
    vq->published_used_idx = (uint16_t)base;
    vq->signalled_used = (uint16_t)base;
    vq->signalled_valid = false;
    return 0;
}

static uint32_t vr_split_get_base(const struct vr_vq *vq)
{
    return vq->last_avail_idx;
}

static void vr_split_init_state(struct vr_vq *vq)
{
    vr_split_set_base(vq, 0);
}

/* Reads one descriptor into a local: each field exactly once (hardening item 4). */
static inline struct vring_desc vr_read_desc(const volatile struct vring_desc *p)
{
    struct vring_desc d;

    d.addr = vr_ld64(&p->addr);
    d.len = vr_ld32(&p->len);
    d.flags = vr_ld16(&p->flags);
    d.next = vr_ld16(&p->next);
    return d;
}

/*
 * Pops the next available chain. Returns 1 with *c and iov filled, 0 if the ring
 * is empty, VR_POP_BROKEN if the ring or chain is malformed (the vq is now broken
 * and the chain was not consumed), VR_POP_NOSPACE if the chain needs more than
 * `max_iov` iovecs (not consumed; the caller decides whether that is fatal).
 */
static int vr_split_pop(struct vr_qp *qp, struct vr_vq *vq, struct iovec *iov, uint64_t *gpa,
                        unsigned max_iov, struct vr_chain *c)
{
    const uint16_t num = (uint16_t)vq->num;     /* <= 32768, power of two */
    const uint32_t qsize = vq->num;
    uint16_t avail_idx, head, i;
    const volatile struct vring_desc *table = vq->desc;
    uint32_t table_size = qsize, budget = qsize, why = VR_BROKEN_DESC;
    bool indirect = false, writable = false;
    int r;

    avail_idx = vr_ld16(&vq->avail->idx);
    if (avail_idx == vq->last_avail_idx)
        return 0;
    if ((uint16_t)(avail_idx - vq->last_avail_idx) > qsize) {
        vr_vq_set_broken(qp, vq, VR_BROKEN_AVAIL_IDX, avail_idx);
        return VR_POP_BROKEN;
    }
    /* acquire: the ring entry and descriptors were written before avail->idx. */
    vr_acquire_after_avail_idx();
    head = vr_ld16(&vq->avail->ring[vq->last_avail_idx & (num - 1)]);
    if (head >= qsize) {
        vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, head);
        return VR_POP_BROKEN;
    }

    c->head = head;
    c->ndesc = 1;
    c->pos = vq->last_avail_idx;
    c->niov = c->nout = 0;
    c->out_len = c->in_len = 0;
    i = head;
    for (;;) {
        struct vring_desc d;

        if (budget-- == 0) {            /* chain longer than its table: a loop */
            why = indirect ? VR_BROKEN_INDIRECT : VR_BROKEN_DESC;
            goto bad;
        }
        d = vr_read_desc(&table[i]);

        if (d.flags & VRING_DESC_F_INDIRECT) {
            uint64_t l = d.len;
            void *p;

            if (!vr_has_feature(qp, VR_F_INDIRECT_DESC)) {
                why = VR_BROKEN_DESC;
                goto bad;
            }
            why = VR_BROKEN_INDIRECT;
            if (indirect || (d.flags & VRING_DESC_F_NEXT) || d.len == 0 || (d.len % 16) ||
                d.len / 16 > qsize)
                goto bad;
            p = vr_xlate_gpa(qp->mem, &qp->xlate_hint, d.addr, &l);
            if (!p) {
                why = VR_BROKEN_ADDR;
                goto bad;
            }
            /* The table must be contiguous in one region (we index it as an
             * array) and 16-byte aligned like the descriptor table (§2.6.5):
             * a misaligned one would make every descriptor load misaligned. */
            if (l < d.len || ((uintptr_t)p & 15))
                goto bad;
            table = p;
            table_size = budget = d.len / 16;
            indirect = true;
            i = 0;
            continue;
        }

        if (d.flags & VRING_DESC_F_WRITE) {
            writable = true;
            c->in_len += d.len;
        } else {
            if (writable)               /* readable after writable: §2.6.4.2 */
                goto bad;
            c->out_len += d.len;
        }
        r = vr_gather(qp->mem, &qp->xlate_hint, d.addr, d.len, iov, gpa, &c->niov, max_iov);
        if (r == -ENOBUFS)
            return VR_POP_NOSPACE;
        if (r) {
            why = VR_BROKEN_ADDR;
            goto bad;
        }
        if (!writable)
            c->nout = c->niov;

        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        if (d.next >= table_size) {
            why = indirect ? VR_BROKEN_INDIRECT : VR_BROKEN_DESC;
            goto bad;
        }
        i = d.next;
    }
    if (c->out_len + c->in_len == 0) {  /* nothing to read or write: malformed */
        why = VR_BROKEN_DESC;
        goto bad;
    }
    vq->last_avail_idx++;
    return 1;

bad:
    vr_vq_set_broken(qp, vq, why, head);
    return VR_POP_BROKEN;
}

/* Gives back chain c and every chain popped after it (they will be popped again). */
static void vr_split_rewind(struct vr_vq *vq, const struct vr_chain *c)
{
    vq->last_avail_idx = (uint16_t)c->pos;
}

static void vr_split_push(struct vr_qp *qp, struct vr_vq *vq, const struct vr_chain *c, uint32_t len)
{
    const uint32_t slot = vq->used_idx & (vq->num - 1);
    volatile struct vring_used_elem *e = &vq->used->ring[slot];

    e->id = c->head;
    e->len = len;
    vr_log_used(qp, vq, 4 + 8ull * slot, sizeof(*e));
    vq->used_idx++;
}

/*
 * Publishes the used elements pushed since the last flush and calls the guest
 * unless it suppressed the interrupt. One call eventfd write per burst at most.
 */
static void vr_split_flush(struct vr_qp *qp, struct vr_vq *vq)
{
    uint16_t new_idx = vq->used_idx;
    bool need;

    if (new_idx == vq->published_used_idx)
        return;
    /* release: used->ring[] entries become visible before the idx that covers them. */
    vr_release_before_used_idx();
    vr_st16(&vq->used->idx, new_idx);
    vr_log_used(qp, vq, 2, 2);
    vq->published_used_idx = new_idx;
    /* seq_cst: our used->idx store must be ordered before reading used_event/flags. */
    vr_full_fence();

    if (vr_has_feature(qp, VR_F_EVENT_IDX)) {
        uint16_t event = vr_ld16(&vq->avail->ring[vq->num]);    /* used_event */
        uint16_t old = vq->signalled_used;
        bool valid = vq->signalled_valid;

        vq->signalled_used = new_idx;
        vq->signalled_valid = true;
        need = !valid || vr_need_event(event, new_idx, old);
    } else {
        need = !(vr_ld16(&vq->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
    }

    if (!need)
        vq->stats.calls_suppressed++;
    else
        vr_vq_call(qp, vq);
}

/* Ask the guest not to kick while we are draining (§2.6.10). */
static void vr_split_disable_notify(struct vr_qp *qp, struct vr_vq *vq)
{
    /* With EVENT_IDX a stale avail_event already suppresses kicks; flags must stay 0. */
    if (!vr_has_feature(qp, VR_F_EVENT_IDX)) {
        vr_st16(&vq->used->flags, VRING_USED_F_NO_NOTIFY);
        vr_log_used(qp, vq, 0, 2);
    }
}

/*
 * Ask the guest to kick on its next addition, then re-check the ring once: the
 * guest may have added buffers after our last look but before seeing the
 * request. True if the ring is not empty after all (caller keeps draining).
 */
static bool vr_split_enable_notify(struct vr_qp *qp, struct vr_vq *vq)
{
    if (vr_has_feature(qp, VR_F_EVENT_IDX)) {
        vr_st16((volatile uint16_t *)&vq->used->ring[vq->num], vq->last_avail_idx); /* avail_event */
        vr_log_used(qp, vq, 4 + 8ull * vq->num, 2);
    } else {
        vr_st16(&vq->used->flags, 0);
        vr_log_used(qp, vq, 0, 2);
    }
    /* seq_cst: the request must be visible before we re-read avail->idx. */
    vr_full_fence();
    return vr_ld16(&vq->avail->idx) != vq->last_avail_idx;
}

const struct vr_ring_ops vr_split_ops = {
    .map = vr_split_map,
    .pop = vr_split_pop,
    .rewind = vr_split_rewind,
    .push = vr_split_push,
    .flush = vr_split_flush,
    .disable_notify = vr_split_disable_notify,
    .enable_notify = vr_split_enable_notify,
    .set_base = vr_split_set_base,
    .get_base = vr_split_get_base,
    .init_state = vr_split_init_state,
};
