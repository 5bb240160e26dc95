/*
 * capture.c — frames copied out of the datapath for `vhostctl capture` (pcap).
 *
 * One capture ring per queue pair: a single-producer (the pair's worker),
 * single-consumer (the control plane) byte ring of records
 *     struct vr_cap_rec | caplen bytes of the Ethernet frame | padding to 8
 * written with wrap-around copies. The producer publishes `head` with a release
 * store after the record's bytes; the consumer publishes `tail` the same way
 * after copying records out. A record that does not fit in the free space is
 * not written, only counted (drops): a slow reader loses capture frames, the
 * guest loses nothing and waits for nothing.
 *
 * Cost while no capture runs: the worker tests qp->capture (NULL) once per
 * frame. While one runs: a clock read and a copy of at most snaplen bytes.
 * TX frames are taken after their vnet header passed the checks, as the guest
 * sent them and before the TAP; RX frames after the TAP delivered them into
 * guest buffers. The vnet header is not part of the record.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "vr_internal.h"

struct vr_capture {
    uint64_t head;                      /* producer: bytes ever written (release) */
    uint64_t tail;                      /* consumer: bytes ever consumed (release) */
    uint64_t frames;                    /* records written */
    uint64_t drops;                     /* records that did not fit */
    uint32_t size;                      /* bytes in data, a power of two */
    uint32_t snaplen;
    uint32_t dirs;                      /* VR_CAP_RX | VR_CAP_TX */
    uint32_t queue;                     /* the queue pair it is attached to, for the records */
    uint8_t *data;
};

_Static_assert(sizeof(struct vr_cap_rec) == 24, "capture record header layout");

struct vr_capture *vr_capture_new(uint32_t bytes, uint32_t snaplen, uint32_t dirs, uint32_t queue)
{
    struct vr_capture *c;

    if (bytes < 4096 || bytes > (1u << 30) || (bytes & (bytes - 1)) || !snaplen || snaplen > 65535 + 18 ||
        !dirs || (dirs & ~(uint32_t)(VR_CAP_RX | VR_CAP_TX))) {
        errno = EINVAL;
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->data = malloc(bytes);
    if (!c->data) {
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    c->size = bytes;
    c->snaplen = snaplen;
    c->dirs = dirs;
    c->queue = queue;
    return c;
}

void vr_capture_free(struct vr_capture *c)
{
    if (c) {
        free(c->data);
        free(c);
    }
}

static void vr_cap_put(struct vr_capture *c, uint64_t at, const void *src, uint32_t n)
{
    uint32_t off = (uint32_t)(at & (c->size - 1)), first = c->size - off;

    if (first >= n) {
        memcpy(c->data + off, src, n);
    } else {
        memcpy(c->data + off, src, first);
        memcpy(c->data, (const uint8_t *)src + first, n - first);
    }
}

static void vr_cap_get(const struct vr_capture *c, uint64_t at, void *dst, uint32_t n)
{
    uint32_t off = (uint32_t)(at & (c->size - 1)), first = c->size - off;

    if (first >= n) {
        memcpy(dst, c->data + off, n);
    } else {
        memcpy(dst, c->data + off, first);
        memcpy((uint8_t *)dst + first, c->data, n - first);
    }
}

static inline uint32_t vr_cap_pad8(uint32_t n)
{
    return (n + 7) & ~7u;
}

/*
 * Worker side: one frame of `len` bytes described by iov (after skipping `skip`
 * bytes: the vnet header), direction `dir`. Only called with qp->capture set.
 */
void vr_capture_frame(struct vr_qp *qp, uint32_t dir, const struct iovec *iov, unsigned niov, size_t skip,
                      uint32_t len)
{
    struct vr_capture *c = qp->capture;
    struct vr_cap_rec rec;
    struct timespec ts;
    uint64_t head, tail;
    uint32_t caplen, total;

    if (!(c->dirs & dir))
        return;
    caplen = len < c->snaplen ? len : c->snaplen;
    total = vr_cap_pad8((uint32_t)sizeof(rec) + caplen);
    head = c->head;                     /* only this thread writes it */
    /* acquire: the consumer has finished reading the bytes it gave back. */
    tail = __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE);
    if (c->size - (head - tail) < total) {
        __atomic_fetch_add(&c->drops, 1, __ATOMIC_RELAXED);
        return;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    rec.len = total;
    rec.caplen = caplen;
    rec.origlen = len;
    rec.dir = (uint8_t)dir;
    rec.queue = (uint8_t)c->queue;
    rec.pad = 0;
    rec.ts_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    vr_cap_put(c, head, &rec, sizeof(rec));
    {
        uint64_t at = head + sizeof(rec);
        uint32_t left = caplen;

        for (unsigned k = 0; k < niov && left; k++) {
            size_t l = iov[k].iov_len;
            const uint8_t *b = iov[k].iov_base;
            uint32_t n;

            if (skip >= l) {
                skip -= l;
                continue;
            }
            b += skip;
            l -= skip;
            skip = 0;
            n = l < left ? (uint32_t)l : left;
            vr_cap_put(c, at, b, n);
            at += n;
            left -= n;
        }
    }
    __atomic_fetch_add(&c->frames, 1, __ATOMIC_RELAXED);
    /* release: the record's bytes are visible before the head that covers them. */
    __atomic_store_n(&c->head, head + total, __ATOMIC_RELEASE);
}

long vr_capture_read(struct vr_capture *c, uint8_t *buf, uint64_t len)
{
    uint64_t tail, head, done = 0;

    if (!c || (!buf && len))
        return -EINVAL;
    tail = c->tail;                     /* only the consumer writes it */
    /* acquire: the records up to head are complete. */
    head = __atomic_load_n(&c->head, __ATOMIC_ACQUIRE);
    while (tail < head) {
        struct vr_cap_rec rec;

        vr_cap_get(c, tail, &rec, sizeof(rec));
        if (rec.len > len - done)
            break;                      /* whole records only */
        vr_cap_get(c, tail, buf + done, rec.len);
        done += rec.len;
        tail += rec.len;
    }
    /* release: done reading before the producer may overwrite. */
    __atomic_store_n(&c->tail, tail, __ATOMIC_RELEASE);
    return (long)done;
}

uint64_t vr_capture_frames(const struct vr_capture *c)
{
    return c ? __atomic_load_n(&c->frames, __ATOMIC_RELAXED) : 0;
}

uint64_t vr_capture_drops(const struct vr_capture *c)
{
    return c ? __atomic_load_n(&c->drops, __ATOMIC_RELAXED) : 0;
}
