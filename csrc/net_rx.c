/*
 * net_rx.c — TAP -> guest (the RX virtqueue of a queue pair), virtio 1.1 §5.1.6.3.
 *
 * Without mergeable buffers handling (this version) each frame uses one chain of
 * writable descriptors: readv() straight from the TAP into guest memory (the
 * kernel's copy is the only one), then num_buffers = 1 when the header is 12
 * bytes (valid with and without MRG_RXBUF), then one used element {head, bytes}.
 *
 * Two wake-up sources (REFERENCE "Datapath traps"): the TAP becoming readable and
 * the guest kicking after posting buffers. When the ring is empty we stop watching
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
        n = readv(qp->tap_fd, iov, (int)niov);
    }
    return n < 0 ? -errno : n;
}

enum vr_rx_state vr_rx_process(struct vr_qp *qp)
{
    struct vr_vq *vq = &qp->vq[VR_RX];
    const uint32_t hl = qp->vnet_hdr_len;
    enum vr_rx_state state = VR_RX_MORE;
    struct vr_chain c;
    unsigned n = 0, tries = 0;

    if (!vr_vq_ready(vq) || !vq->enabled)
        return VR_RX_OFF;
    if (qp->tap_dead)
        return VR_RX_TAP_DEAD;
    vr_vq_disable_notify(qp, vq);
    for (;;) {
        ssize_t got;
        bool trunc;
        int r;

        if (tries == VR_BURST) {
            state = VR_RX_MORE;
            break;
        }
        r = vr_vq_pop(qp, vq, qp->rx_iov, VR_MAX_IOV, &c);
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
        if (c.nout) {
            /* Readable descriptors on RX: a malformed chain (left unconsumed). */
            vr_vq_unpop(vq);
            vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, c.head);
            state = VR_RX_OFF;
            break;
        }
        tries++;
        got = vr_rx_read(qp, qp->rx_iov, c.niov, &trunc);
        if (got == -EAGAIN || got == -EWOULDBLOCK || got == -EINTR) {
            vr_vq_unpop(vq);
            state = got == -EINTR ? VR_RX_MORE : VR_RX_TAP_EMPTY;
            break;
        }
        if (got == 0 || (got < 0 && got != -EFAULT && got != -EINVAL && got != -EMSGSIZE)) {
            /* EOF (the stand-in's peer went away), EBADFD (queue detached), ...:
             * not per-frame failures. Stop reading until the next resume. */
            vr_vq_unpop(vq);
            qp->tap_dead = true;
            state = VR_RX_TAP_DEAD;
            break;
        }
        if (got < 0 || trunc || (size_t)got < hl) {
            /* Frame larger than the chain (the kernel dropped it) or a runt. */
            vr_vq_unpop(vq);
            vq->stats.drop_ring_full++;
            continue;
        }
        if (hl == 12) {
            const uint16_t one = 1;     /* num_buffers, le16 at offset 10 */

            vr_iov_copy_in(qp->rx_iov, c.niov, 10, &one, sizeof(one));
        }
        vr_vq_push(vq, c.head, (uint32_t)got);
        vq->stats.packets++;
        vq->stats.bytes += (uint64_t)got - hl;
        n++;
    }
    vr_vq_flush(qp, vq);
    vr_hist_add(&vq->stats, n);
    return state;
}
