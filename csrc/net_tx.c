/*
 * net_tx.c — guest -> TAP (the TX virtqueue of a queue pair), virtio 1.1 §5.1.6.2.
 *
 * Each chain is [virtio_net_hdr][frame], readable descriptors only. The header is
 * copied into a local (it may be split over descriptors and the guest may change
 * it while we look), validated against the negotiated offloads, sanitized, and
 * handed to the TAP as iov[0]; the frame bytes go from guest memory straight into
 * writev() (zero copy in userspace). Its layout equals the TAP's vnet header once
 * TUNSETVNETHDRSZ matches vnet_hdr_len (10, or 12 with VERSION_1/MRG_RXBUF).
 * Frames up to 64 KiB + Ethernet + VLAN pass (GSO), over up to VR_MAX_IOV - 1
 * guest segments.
 *
 * Small frames are the exception to zero copy: a chain whose header + frame
 * total at most qp->tx_copy_max bytes (vr_qp_set_tx_copy_max, default 512, 0 =
 * never) is copied, all of it, in one pass into the slot's bounce buffer and
 * written as one buffer (write() / IORING_OP_WRITE): a write of one buffer
 * costs the kernel less than a writev of several, by more than the copy costs
 * at these sizes (measurements: docs/notes/perf-changes.md). The header is
 * taken from that copy into a local, checked and sanitized as above and written
 * back over the copy, so the TAP gets the checked header and guest memory is
 * read exactly once. A guest buffer that already holds header + frame is never
 * handed to the kernel as is: the kernel would read the header from guest
 * memory after we checked our copy of it (a double fetch), and we may not
 * write the sanitized header into a device-readable buffer.
 *
 * A chain is always returned used (len 0: the device wrote nothing), whether it
 * was sent or dropped. A copied chain could be returned right after the copy, but
 * the used index is published once per burst anyway (vr_vq_flush), so every
 * chain of an io_uring burst is still returned after the burst's completions, in
 * the order popped: used entries are only ever published after the TAP write
 * finished. Bursts are bounded (VR_BURST) so RX is never starved.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vr_internal.h"

#define VNET_HDR_F_NEEDS_CSUM 1
#define VNET_HDR_GSO_NONE 0
#define VNET_HDR_GSO_TCPV4 1
#define VNET_HDR_GSO_UDP 3
#define VNET_HDR_GSO_TCPV6 4
#define VNET_HDR_GSO_UDP_L4 5
#define VNET_HDR_GSO_ECN 0x80

#define ETH_HLEN 14
#define VR_TX_MAX_FRAME (65535u + 14u + 4u)
#define VR_IPV4_HLEN 20u                /* smallest network headers Linux assumes */
#define VR_IPV6_HLEN 40u
#define VR_TCP_HLEN 20u
#define VR_UDP_HLEN 8u
#define VR_TCP_CSUM_OFF 16u             /* offsetof(struct tcphdr, check) */
#define VR_UDP_CSUM_OFF 6u              /* offsetof(struct udphdr, check) */
#define VR_UDP_MAX_SEGMENTS 128u        /* Linux UDP_MAX_SEGMENTS (6.x) */
#define VR_GSO_BY_FRAGS 0xffffu         /* a Linux-internal gso_size, never valid on the wire */

struct vr_vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;               /* only in the 12-byte form */
};
_Static_assert(sizeof(struct vr_vnet_hdr) == 12, "vnet header layout");

/* Copies the first `len` bytes described by iov into dst. */
static void vr_iov_copy_out(void *dst, const struct iovec *iov, unsigned niov, size_t len)
{
    uint8_t *d = dst;

    for (unsigned k = 0; k < niov && len; k++) {
        size_t n = iov[k].iov_len < len ? iov[k].iov_len : len;

        memcpy(d, iov[k].iov_base, n);
        d += n;
        len -= n;
    }
}

static inline uint32_t vr_max32(uint32_t a, uint32_t b)
{
    return a > b ? a : b;
}

/*
 * Validates and sanitizes the local header copy for a frame of `frame_len` bytes
 * (virtio 1.2 §5.1.6.2, plus what tun's virtio_net_hdr_to_skb() refuses, so that
 * a malformed header is counted here instead of vanishing in the kernel):
 *  - flags: only NEEDS_CSUM (DATA_VALID / RSC_INFO are device-to-driver only),
 *    and only with VIRTIO_NET_F_CSUM; then csum_start + max(L4 header,
 *    csum_offset + 2) and max(L3 minimum, csum_start) + L4 header fit the frame;
 *  - gso_type: NONE, TCPV4 (HOST_TSO4), TCPV6 (HOST_TSO6), UDP (HOST_UFO),
 *    UDP_L4 (HOST_USO), each only if acked; the ECN bit only on TCP with
 *    HOST_ECN; anything else is refused;
 *  - GSO: gso_size in 1..65534, hdr_len <= frame; TCP and UDP_L4 need
 *    NEEDS_CSUM with the checksum field of their L4 header; UDP_L4 at most 128
 *    segments. (Linux accepts TCP GSO without NEEDS_CSUM only after a flow
 *    dissection we do not repeat; no guest sends it, so we refuse it.)
 * Fields without meaning for the chosen offloads are zeroed.
 */
static bool vr_tx_hdr_ok(const struct vr_qp *qp, struct vr_vnet_hdr *h, uint32_t frame_len)
{
    const uint8_t gso = h->gso_type & (uint8_t)~VNET_HDR_GSO_ECN;
    const bool ecn = h->gso_type & VNET_HDR_GSO_ECN;
    const bool csum = h->flags & VNET_HDR_F_NEEDS_CSUM;
    uint32_t thlen, nh_min = VR_IPV4_HLEN, p_off = 0;
    bool tcp = false;

    if (h->flags & ~VNET_HDR_F_NEEDS_CSUM)
        return false;
    switch (gso) {
    case VNET_HDR_GSO_NONE:
        thlen = 0;
        break;
    case VNET_HDR_GSO_TCPV4:
        if (!vr_has_feature(qp, VR_F_HOST_TSO4))
            return false;
        thlen = VR_TCP_HLEN;
        tcp = true;
        break;
    case VNET_HDR_GSO_TCPV6:
        if (!vr_has_feature(qp, VR_F_HOST_TSO6))
            return false;
        thlen = VR_TCP_HLEN;
        nh_min = VR_IPV6_HLEN;
        tcp = true;
        break;
    case VNET_HDR_GSO_UDP:
        if (!vr_has_feature(qp, VR_F_HOST_UFO))
            return false;
        thlen = VR_UDP_HLEN;
        break;
    case VNET_HDR_GSO_UDP_L4:
        if (!vr_has_feature(qp, VR_F_HOST_USO))
            return false;
        thlen = VR_UDP_HLEN;
        break;
    default:
        return false;
    }
    if (ecn && (!tcp || !vr_has_feature(qp, VR_F_HOST_ECN)))
        return false;

    if (csum) {
        uint32_t start = h->csum_start, off = h->csum_offset;

        if (!vr_has_feature(qp, VR_F_CSUM))
            return false;
        if (start + vr_max32(thlen, off + 2u) > frame_len)
            return false;
        p_off = vr_max32(nh_min, start) + thlen;
        if (p_off > frame_len)
            return false;
    } else {
        h->csum_start = 0;
        h->csum_offset = 0;
        if (tcp || gso == VNET_HDR_GSO_UDP_L4)
            return false;
        if (gso == VNET_HDR_GSO_UDP && frame_len < ETH_HLEN + VR_IPV4_HLEN + VR_UDP_HLEN)
            return false;
    }

    if (gso == VNET_HDR_GSO_NONE) {
        h->gso_size = 0;
        h->hdr_len = 0;
    } else {
        if (h->gso_size == 0 || h->gso_size == VR_GSO_BY_FRAGS || h->hdr_len > frame_len)
            return false;
        if (tcp && h->csum_offset != VR_TCP_CSUM_OFF)
            return false;
        if (gso == VNET_HDR_GSO_UDP_L4 &&
            (h->csum_offset != VR_UDP_CSUM_OFF ||
             frame_len - p_off > (uint32_t)h->gso_size * VR_UDP_MAX_SEGMENTS))
            return false;
    }
    h->num_buffers = 0;                 /* TX: must be 0; the TAP ignores it anyway */
    return true;
}

/*
 * Validates popped chain s->c (guest iovecs at iov[1..], iov[0] free for the
 * header) and turns it into the TAP request: either the whole frame copied into
 * `bounce` (s->copied, small frames), or iov as s->iov_first / s->iov_cnt with
 * the local header copy s->hdr first. false: dropped before the TAP (counted).
 */
static bool vr_tx_prepare(struct vr_qp *qp, struct vr_vq *vq, struct iovec *iov, struct vr_tx_slot *s,
                          uint8_t *bounce)
{
    const struct vr_chain *c = &s->c;
    const uint32_t hl = qp->vnet_hdr_len;
    struct iovec *g = iov + 1;          /* guest iovecs */
    struct vr_vnet_hdr hdr = { 0 };
    unsigned first = 0;
    size_t skip = hl;
    uint32_t frame_len;

    s->copied = false;
    s->iov_first = s->iov_cnt = 0;
    if (!vq->enabled) {
        vq->stats.drop_disabled++;
        return false;
    }
    if (c->out_len < hl + ETH_HLEN || c->out_len > hl + VR_TX_MAX_FRAME) {
        vq->stats.drop_bad_hdr++;
        return false;
    }
    frame_len = (uint32_t)(c->out_len - hl);
    s->frame_len = frame_len;
    s->copied = c->out_len <= qp->tx_copy_max;

    if (s->copied) {
        /* The single read of the guest's bytes, header and frame; the header is
         * checked in (a local taken from) the copy that the TAP will get. */
        vr_iov_copy_out(bounce, g, c->niov, c->out_len);
        memcpy(&hdr, bounce, hl);
    } else {
        /* The single read of the guest's header. */
        vr_iov_copy_out(&hdr, g, c->niov, hl);
    }
    if (!vr_tx_hdr_ok(qp, &hdr, frame_len)) {
        vq->stats.drop_bad_hdr++;
        return false;
    }
    if (s->copied) {
        memcpy(bounce, &hdr, hl);       /* sanitized, as the zero-copy path's iov[0] */
        qp->tx_copied++;
        if (qp->capture) {
            struct iovec one = { .iov_base = bounce, .iov_len = hl + frame_len };

            vr_capture_frame(qp, VR_CAP_TX, &one, 1, hl, frame_len);
        }
        return true;
    }

    /* Skip the header bytes in the guest iovecs; iov[first] becomes the local header. */
    while (skip) {
        if (g[first].iov_len <= skip) {
            skip -= g[first].iov_len;
            first++;
        } else {
            g[first].iov_base = (uint8_t *)g[first].iov_base + skip;
            g[first].iov_len -= skip;
            skip = 0;
        }
    }
    memcpy(s->hdr, &hdr, sizeof(hdr));
    iov[first].iov_base = s->hdr;
    iov[first].iov_len = hl;
    s->iov_first = first;
    s->iov_cnt = c->niov + 1 - first;
    if (qp->capture)
        vr_capture_frame(qp, VR_CAP_TX, iov + first, s->iov_cnt, hl, frame_len);
    return true;
}

/* Counts the TAP's answer for one frame, as writev() gave it (bytes or -errno). */
static inline void vr_tx_account(struct vr_vq *vq, const struct vr_tx_slot *s, ssize_t res)
{
    if (res < 0) {
        if (res == -EAGAIN || res == -EWOULDBLOCK || res == -ENOBUFS)
            vq->stats.drop_tap_busy++;
        else
            vq->stats.drop_tap_error++;
    } else {
        vq->stats.packets++;
        vq->stats.bytes += s->frame_len;
    }
}

/* One frame the plain way: write() of the bounce copy, or writev() of iov. */
static inline ssize_t vr_tx_write_now(struct vr_qp *qp, const struct vr_tx_slot *s, const uint8_t *bounce)
{
    ssize_t n = s->copied ? vr_sys_write(qp->tap_fd, bounce, qp->vnet_hdr_len + s->frame_len)
                          : vr_sys_writev(qp->tap_fd, qp->tx_iov + s->iov_first, (int)s->iov_cnt);

    return n < 0 ? -errno : n;
}

/*
 * io_uring mode: the kernel copies the frames of a burst one after the other,
 * each a cache miss (the guest's CPU wrote them). Touching the lines of small
 * frames here, while the burst is still being assembled, lets those misses
 * overlap instead of stalling the copy one by one.
 */
static inline void vr_tx_prefetch(const struct iovec *g, unsigned n)
{
    for (unsigned k = 0; k < n; k++) {
        const uint8_t *b = g[k].iov_base;
        size_t l = g[k].iov_len;

        if (l && l <= 256) {
            __builtin_prefetch(b);
            __builtin_prefetch(b + l - 1);
        }
    }
}

/*
 * io_uring mode: submits the queued writev()s of slots [0, n) in one
 * io_uring_enter, waits for all of them, counts each result and only then
 * returns the chains used, in the order they were popped. Requests the kernel
 * did not take (the ring failed) are written the plain way, and the queue pair
 * stays in syscall mode from then on.
 */
static void vr_tx_complete_batch(struct vr_qp *qp, struct vr_vq *vq, unsigned n)
{
    struct io_uring_cqe *cqe;
    unsigned submitted;
    int err = vr_uring_submit_wait(&qp->ring, &submitted);

    for (unsigned k = 0; k < n; k++)
        qp->tx_slot[k].res = INT32_MIN;
    while ((cqe = vr_uring_peek(&qp->ring))) {
        if (cqe->user_data < n)
            qp->tx_slot[cqe->user_data].res = cqe->res;
        vr_uring_cqe_seen(&qp->ring);
    }
    if (err) {
        qp->io_mode = VR_IO_SYSCALL;
        qp->io_error = -err;
    }
    for (unsigned k = 0; k < n; k++) {
        struct vr_tx_slot *s = &qp->tx_slot[k];

        if (s->send) {
            if (s->res == INT32_MIN)    /* never submitted */
                s->res = (int32_t)vr_tx_write_now(qp, s, qp->tx_bounce[k]);
            vr_tx_account(vq, s, s->res);
        }
        vr_vq_push(qp, vq, &s->c, 0);
    }
}

bool vr_tx_process(struct vr_qp *qp)
{
    struct vr_vq *vq = &qp->vq[VR_TX];
    const bool batch = qp->io_mode == VR_IO_URING;
    unsigned n = 0, nslot = 0, iov_used = 0;
    bool more = false;

    if (!vr_vq_ready(vq))
        return false;
    vr_vq_disable_notify(qp, vq);
    for (;;) {
        struct vr_tx_slot *s = &qp->tx_slot[nslot];
        struct iovec *iov = qp->tx_iov + iov_used;
        int r;

        if (n == VR_BURST) {
            more = true;
            break;
        }
        if (iov_used + 2 > VR_MAX_IOV) {
            vr_tx_complete_batch(qp, vq, nslot);    /* iovecs used up: send what we have */
            nslot = iov_used = 0;
            continue;
        }
        r = vr_vq_pop(qp, vq, iov + 1, NULL, VR_MAX_IOV - iov_used - 1, &s->c);
        if (r == VR_POP_NOSPACE && nslot) {
            /* The batch holds the iovecs this chain needs: send it first. */
            vr_tx_complete_batch(qp, vq, nslot);
            nslot = iov_used = 0;
            continue;
        }
        if (r == VR_POP_NOSPACE) {
            /* More segments than writev() takes: malformed for us (left unconsumed). */
            vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, s->c.head);
            break;
        }
        if (r < 0)
            break;                      /* broken: counted, vq no longer serviced */
        if (r == 0) {
            if (vr_vq_enable_notify(qp, vq)) {
                vr_vq_disable_notify(qp, vq);
                continue;
            }
            break;
        }
        if (s->c.nout != s->c.niov) {
            /* Writable descriptors on TX: a malformed chain. Left unconsumed,
             * like every other malformed chain. */
            vr_vq_rewind(vq, &s->c);
            vr_vq_set_broken(qp, vq, VR_BROKEN_DESC, s->c.head);
            break;
        }
        n++;
        s->send = vr_tx_prepare(qp, vq, iov, s, qp->tx_bounce[nslot]);
        s->iov_first += iov_used;
        if (!batch) {
            /* Syscall mode: one write(v) per frame, the chain used right after it. */
            if (s->send)
                vr_tx_account(vq, s, vr_tx_write_now(qp, s, qp->tx_bounce[0]));
            vr_vq_push(qp, vq, &s->c, 0);
            continue;
        }
        if (s->send && s->copied) {
            vr_uring_prep_write(&qp->ring, qp->tap_fd, qp->tx_bounce[nslot], qp->vnet_hdr_len + s->frame_len,
                                nslot);
        } else if (s->send) {
            vr_tx_prefetch(qp->tx_iov + s->iov_first + 1, s->iov_cnt - 1);
            vr_uring_prep_rw(&qp->ring, IORING_OP_WRITEV, qp->tap_fd, qp->tx_iov + s->iov_first,
                             s->iov_cnt, nslot);
        }
        nslot++;
        if (!s->copied)                 /* a copied frame no longer needs its iovecs */
            iov_used += 1 + s->c.niov;
    }
    if (nslot)
        vr_tx_complete_batch(qp, vq, nslot);
    vr_vq_flush(qp, vq);
    vr_log_flush(qp);                   /* TX buffers are only read: only ring writes are marked */
    vr_vq_publish(vq);
    vr_hist_add(&vq->stats, n);
    return more;
}
