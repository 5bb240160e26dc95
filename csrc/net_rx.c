/*
 * net_rx.c — TAP -> guest (the RX virtqueue of a queue pair), virtio 1.1 §5.1.6.3
 * and §5.1.6.4 (mergeable receive buffers).
 *
 * Frames are readv()ed straight from the TAP into guest memory (the kernel's copy
 * is the only one); the TAP's vnet header lands in the guest unchanged except
 * num_buffers (12-byte header only).
 *
 * Without MRG_RXBUF a frame uses exactly one chain; a frame larger than it is
 * dropped (counted in drop_ring_full) and the chain reused; a chain smaller than
 * the vnet header is malformed (the ring is broken, VR_BROKEN_DESC). With MRG_RXBUF a
 * frame's size is known only after the read, so we gather chains up front until
 * they hold qp->rx_need bytes (the largest frame the acked offloads allow, see
 * vr_qp_update_rx_need in qp_control.c) or the ring runs dry, readv() once over all of them, publish used
 * entries for the chains actually filled (each with its own length), set
 * num_buffers to their count, and keep the rest for the next frame. Chains still
 * held at the end of a burst are given back by rewinding the avail position, so
 * the ring state is exact whenever the worker parks.
 *
 * Two wake-up sources: the TAP becoming readable and the guest kicking after
 * posting buffers. When the ring is empty we stop watching
 * the TAP (level-triggered epoll would spin), ask for a kick, re-check once, and
 * report VR_RX_RING_EMPTY; worker.c applies the watch changes.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "vr_internal.h"

/* Writes `len` bytes at byte offset `off` of the area iov describes. */
static void vr_iov_copy_in(const struct iovec *iov, unsigned niov, size_t off,
                           const void *src, size_t len)
{
    const uint8_t *s = src;

    for (unsigned k = 0; k < niov && len; k++) {
        size_t n;

        if (off >= iov[k].iov_len) {
            off -= iov[k].iov_len;
            continue;
        }
        n = iov[k].iov_len - off;
        if (n > len)
            n = len;
        memcpy((uint8_t *)iov[k].iov_base + off, s, n);
        s += n;
        len -= n;
        off = 0;
    }
}

/*
 * One frame from the TAP into iov. >= 0 bytes, or -errno. *trunc is set when a
 * socket stand-in truncated the datagram (a real TAP fails with EFAULT/EINVAL
 * instead, dropping the frame itself).
 */
static ssize_t vr_rx_read(struct vr_qp *qp, struct iovec *iov, unsigned niov, bool *trunc)
{
    ssize_t n;

    *trunc = false;
    if (qp->tap_is_socket) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = niov };

        n = recvmsg(qp->tap_fd, &msg, MSG_DONTWAIT);
        if (n >= 0 && (msg.msg_flags & MSG_TRUNC))
            *trunc = true;
    } else {
        n = vr_sys_readv(qp->tap_fd, iov, (int)niov);
    }
    return n < 0 ? -errno : n;
}

/* Moves the stash (chains and their iovecs) to the front of its arrays. */
static void vr_stash_compact(struct vr_qp *qp)
{
    unsigned f = qp->stash_first, n = qp->stash_count;
    unsigned iov0 = n ? qp->rx_stash[f].iov_first : qp->stash_iov_end;

    if (iov0) {
        memmove(qp->rx_iov, qp->rx_iov + iov0, (qp->stash_iov_end - iov0) * sizeof(struct iovec));
        memmove(qp->rx_gpa, qp->rx_gpa + iov0, (qp->stash_iov_end - iov0) * sizeof(uint64_t));
    }
    if (f)
        memmove(qp->rx_stash, qp->rx_stash + f, n * sizeof(struct vr_chain));
    for (unsigned k = 0; k < n; k++)
        qp->rx_stash[k].iov_first -= iov0;
    qp->stash_first = 0;
    qp->stash_iov_end -= iov0;
}

/* Gives every stashed chain back to the ring (they will be popped again).
 * Touches only the device's own position, never guest memory. */
static void vr_stash_return(struct vr_qp *qp, struct vr_vq *vq)
{
    if (qp->stash_count)
        vr_vq_rewind(vq, &qp->rx_stash[qp->stash_first]);
    qp->stash_first = qp->stash_count = qp->stash_iov_end = 0;
    qp->stash_bytes = 0;
}

void vr_rx_stash_forget(struct vr_qp *qp)
{
    vr_stash_return(qp, &qp->vq[VR_RX]);
}

/*
 * Tops the stash up for the next frame: one chain without MRG_RXBUF, chains
 * holding qp->rx_need bytes with it. 1: at least one chain stashed; 0: ring
 * empty (nothing stashed); VR_POP_BROKEN: the vq broke.
 */
static int vr_stash_fill(struct vr_qp *qp, struct vr_vq *vq, bool mrg)
{
    while (qp->stash_count == 0 || (mrg && qp->stash_bytes < qp->rx_need)) {
        struct vr_chain c;
        int r;

        if (qp->stash_first + qp->stash_count == VR_MAX_IOV || qp->stash_iov_end == VR_MAX_IOV) {
            if (qp->stash_first == 0 && qp->rx_stash[0].iov_first == 0)
                break;                  /* iovecs exhausted: read with what we hold */
            vr_stash_compact(qp);
        }
        r = vr_vq_pop(qp, vq, qp->rx_iov + qp->stash_iov_end, qp->rx_gpa + qp->stash_iov_end,
                      VR_MAX_IOV - qp->stash_iov_end, &c);
        if (r == VR_POP_NOSPACE) {
            if (qp->stash_count == 0 && qp->stash_iov_end == 0) {
                vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, c.head);  /* > VR_MAX_IOV segments */
                return VR_POP_BROKEN;
            }
            /* Compact only if that frees iovecs (else this would loop forever). */
            if (qp->stash_first || qp->rx_stash[qp->stash_first].iov_first) {
                vr_stash_compact(qp);
                continue;
            }
            break;                      /* the stash fills the iovecs: read with it */
        }
        if (r < 0)
            return VR_POP_BROKEN;
        if (r == 0)
            break;
        if (c.nout) {
            /* Readable descriptors on RX: a malformed chain (left unconsumed). */
            vr_vq_rewind(vq, &c);
            vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, c.head);
            return VR_POP_BROKEN;
        }
        c.iov_first = qp->stash_iov_end;
        qp->stash_iov_end += c.niov;
        qp->rx_stash[qp->stash_first + qp->stash_count++] = c;
        qp->stash_bytes += c.in_len;
    }
    return qp->stash_count ? 1 : 0;
}

/* Dirty log: the `got` bytes the kernel and num_buffers wrote from iovec `k` on. */
static void vr_rx_log(struct vr_qp *qp, unsigned k, uint64_t got)
{
    for (; got && k < qp->stash_iov_end; k++) {
        uint64_t n = qp->rx_iov[k].iov_len < got ? qp->rx_iov[k].iov_len : got;

        vr_log_write(qp, qp->rx_gpa[k], n);
        got -= n;
    }
}

/*
 * Publishes a frame of `got` bytes read into the stash: used entries for the
 * chains it filled (in order, each with its own length), num_buffers first.
 */
static void vr_rx_complete(struct vr_qp *qp, struct vr_vq *vq, uint64_t got)
{
    const struct vr_chain *first = &qp->rx_stash[qp->stash_first];
    unsigned used = 0;
    uint64_t rest = got, bytes = 0;

    /* Count the chains the frame reached (a zero-length chain in between counts). */
    while (used < qp->stash_count) {
        const struct vr_chain *c = &first[used++];

        bytes += c->in_len;
        if (bytes >= got)
            break;
    }
    if (qp->vnet_hdr_len == 12) {
        const uint16_t nb = (uint16_t)used;   /* num_buffers, le16 at offset 10 */

        vr_iov_copy_in(qp->rx_iov + first->iov_first, qp->stash_iov_end - first->iov_first,
                       10, &nb, sizeof(nb));
    }
    if (qp->log_on)
        vr_rx_log(qp, first->iov_first, got);   /* header, num_buffers and payload */
    for (unsigned k = 0; k < used; k++) {
        uint64_t l = first[k].in_len < rest ? first[k].in_len : rest;

        vr_vq_push(qp, vq, &first[k], (uint32_t)l);
        rest -= l;
        qp->stash_bytes -= first[k].in_len;
    }
    qp->stash_first += used;
    qp->stash_count -= used;
    if (qp->stash_count == 0)
        qp->stash_first = qp->stash_iov_end = 0;
}

enum vr_rx_state vr_rx_process(struct vr_qp *qp)
{
    struct vr_vq *vq = &qp->vq[VR_RX];
    const uint32_t hl = qp->vnet_hdr_len;
    const bool mrg = vr_has_feature(qp, VR_F_MRG_RXBUF);
    enum vr_rx_state state = VR_RX_MORE;
    unsigned n = 0, tries = 0;

    if (!vr_vq_ready(vq) || !vq->enabled)
        return VR_RX_OFF;
    if (qp->tap_dead)
        return VR_RX_TAP_DEAD;
    vr_vq_disable_notify(qp, vq);
    for (;;) {
        const struct vr_chain *c;
        unsigned niov;
        ssize_t got;
        bool trunc;
        int r;

        if (tries == VR_BURST) {
            state = VR_RX_MORE;
            break;
        }
        r = vr_stash_fill(qp, vq, mrg);
        if (r < 0) {
            state = VR_RX_OFF;          /* broken */
            break;
        }
        if (r == 0) {
            if (vr_vq_enable_notify(qp, vq)) {
                vr_vq_disable_notify(qp, vq);
                continue;
            }
            state = VR_RX_RING_EMPTY;
            break;
        }
        c = &qp->rx_stash[qp->stash_first];
        if (!mrg && c->in_len < hl) {
            /* A chain that cannot hold the vnet header (virtio 1.2 §5.1.6.3.1: every
             * receive buffer MUST be at least that big): malformed, handled like the
             * others (ring broken, counted and logged once, the chain left unconsumed
             * by vr_stash_return below). Read into, it would fail every frame and
             * stay at the head of the ring: all later frames dropped as ring full. */
            vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, c->head);
            state = VR_RX_OFF;
            break;
        }
        tries++;
        niov = mrg ? qp->stash_iov_end - c->iov_first : c->niov;
        got = vr_rx_read(qp, qp->rx_iov + c->iov_first, niov, &trunc);
        if (got == -EAGAIN || got == -EWOULDBLOCK || got == -EINTR) {
            state = got == -EINTR ? VR_RX_MORE : VR_RX_TAP_EMPTY;
            break;
        }
        if (got == 0 || (got < 0 && got != -EFAULT && got != -EINVAL && got != -EMSGSIZE)) {
            /* EOF (the stand-in's peer went away), EBADFD (queue detached), ...:
             * not per-frame failures. Stop reading until the next resume. */
            qp->tap_dead = true;
            state = VR_RX_TAP_DEAD;
            break;
        }
        if (got < 0 || trunc || (size_t)got < hl) {
            /* Frame larger than the buffers (the kernel dropped it) or a runt:
             * the chains stay stashed for the next frame. The kernel may have
             * written into them all the same (a truncated copy, a partial one
             * before EFAULT): those pages are marked too, so that a migrated
             * guest's memory is the source's byte for byte. */
            vr_rx_log(qp, c->iov_first, got > 0 ? (uint64_t)got : UINT64_MAX);
            vq->stats.drop_ring_full++;
            continue;
        }
        if (qp->capture)
            vr_capture_frame(qp, VR_CAP_RX, qp->rx_iov + c->iov_first, niov, hl, (uint32_t)(got - hl));
        vr_rx_complete(qp, vq, (uint64_t)got);
        vq->stats.packets++;
        vq->stats.bytes += (uint64_t)got - hl;
        n++;
    }
    vr_stash_return(qp, vq);
    vr_vq_flush(qp, vq);
    vr_log_flush(qp);
    vr_vq_publish(vq);
    vr_hist_add(&vq->stats, n);
    return state;
}
