/*
 * vr_uring.h — a minimal io_uring submission/completion ring over the raw
 * syscalls (io_uring_setup(2), io_uring_enter(2), io_uring_register(2); Linux
 * include/uapi/linux/io_uring.h), used by the worker to hand the TAP a whole burst
 * of writev/readv requests per kernel crossing. Header-only so that
 * bench/tapwrite.c can measure exactly the code the datapath runs.
 *
 * Only what the datapath needs: one ring per worker thread, SQEs filled in order
 * and submitted together, then every completion waited for before the caller
 * touches the ring state the requests depend on (the guest buffers stay owned by
 * the kernel until their CQE is seen).
 *
 * Memory ordering (the io_uring ABI, same as the virtio rings): SQEs are written
 * before a release store of sq.tail; cq.tail is read with acquire before the
 * CQEs it covers; cq.head is advanced with a release store after they are read.
 */
#ifndef VR_URING_H
#define VR_URING_H

#include <errno.h>
#include <linux/fs.h>                  /* RWF_NOWAIT */
#include <linux/io_uring.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

struct vr_uring {
    int fd;                             /* -1: no ring */
    unsigned entries;                   /* SQ entries */
    unsigned *sq_head, *sq_tail, sq_mask;
    unsigned *cq_head, *cq_tail, cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned sq_local_tail;             /* SQEs filled but not yet published */
    unsigned pending;                   /* SQEs filled since the last submit */
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
    unsigned flags;                     /* setup flags the kernel accepted */
    int reg_fd;                         /* the fd registered as fixed file 0, or -1 */
};

static inline int vr_uring_sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static inline int vr_uring_sys_enter(int fd, unsigned submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, NULL, 0);
}

static inline void vr_uring_free(struct vr_uring *r)
{
    /* The kernel tears a closed ring down asynchronously, and with it drops its
     * reference to a registered file: unregister first, synchronously, so that
     * the TAP queue is released when the caller closes its own fd (a port that
     * reopens the same TAP at once must not find it busy). With SINGLE_ISSUER
     * only the ring's own thread may do this. */
    if (r->fd >= 0 && r->reg_fd >= 0)
        syscall(__NR_io_uring_register, r->fd, IORING_UNREGISTER_FILES, NULL, 0);
    if (r->sqes && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    r->reg_fd = -1;
}

/*
 * Sets up a ring of `entries` SQEs (CQ twice that, the kernel's default) for the
 * calling thread. Tries SINGLE_ISSUER|DEFER_TASKRUN first (6.1+: completions are
 * only processed when this thread asks), then no flags. 0 or -errno: ENOSYS (no
 * io_uring), EPERM (kernel.io_uring_disabled, a seccomp filter), ENOMEM, ...
 */
static inline int vr_uring_init(struct vr_uring *r, unsigned entries)
{
    static const unsigned try_flags[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, 0,
    };
    struct io_uring_params p;
    int fd = -1, err = ENOSYS;

    memset(r, 0, sizeof(*r));
    r->fd = -1;
    r->reg_fd = -1;
    for (unsigned k = 0; k < sizeof(try_flags) / sizeof(try_flags[0]); k++) {
        memset(&p, 0, sizeof(p));
        p.flags = try_flags[k];
        fd = vr_uring_sys_setup(entries, &p);
        if (fd >= 0) {
            r->flags = try_flags[k];
            break;
        }
        err = errno;
        if (err != EINVAL)              /* EINVAL: flags unknown to this kernel */
            return -err;
    }
    if (fd < 0)
        return -err;
    r->fd = fd;
    r->entries = p.sq_entries;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        goto fail;

    {
        uint8_t *sq = r->sq_map, *cq = r->cq_map;
        unsigned *array = (unsigned *)(sq + p.sq_off.array);

        r->sq_head = (unsigned *)(sq + p.sq_off.head);
        r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
        r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
        r->cq_head = (unsigned *)(cq + p.cq_off.head);
        r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
        r->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
        r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
        /* SQE slot i is always array entry i: set once, never touched again. */
        for (unsigned i = 0; i < p.sq_entries; i++)
            array[i] = i;
        r->sq_local_tail = *r->sq_tail;
    }
    return 0;

fail:
    err = errno;
    vr_uring_free(r);
    return -err;
}

/*
 * Registers `fd` as fixed file 0: requests on it then skip the per-request
 * fget/fput (two atomics on the file's refcount in a threaded process). The ring
 * holds a reference to the file until vr_uring_free(). 0 or -errno (the ring
 * still works, with plain fds).
 */
static inline int vr_uring_register_fd(struct vr_uring *r, int fd)
{
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES, &fd, 1) < 0)
        return -errno;
    r->reg_fd = fd;
    return 0;
}

/* Room for `n` more SQEs before the next submit? */
static inline bool vr_uring_room(const struct vr_uring *r, unsigned n)
{
    return r->pending + n <= r->entries;
}

/* Queues one readv/writev of iov[0..iovcnt) on fd (offset 0: the TAP is a stream). */
static inline void vr_uring_prep_rw(struct vr_uring *r, uint8_t op, int fd, const struct iovec *iov,
                                    unsigned iovcnt, uint64_t user_data)
{
    struct io_uring_sqe *sqe = &r->sqes[r->sq_local_tail & r->sq_mask];

    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = op;
    if (fd == r->reg_fd) {
        sqe->fd = 0;
        sqe->flags = IOSQE_FIXED_FILE;
    } else {
        sqe->fd = fd;
    }
    sqe->addr = (uint64_t)(uintptr_t)iov;
    sqe->len = iovcnt;
    /* Never wait: without RWF_NOWAIT io_uring answers EAGAIN on a pollable fd by
     * arming a poll and completing later, which would hold the burst (and the
     * worker) until the TAP drains. With it, EAGAIN comes back as the result,
     * exactly as readv/writev on the O_NONBLOCK fd report it. */
    sqe->rw_flags = RWF_NOWAIT;
    sqe->user_data = user_data;
    r->sq_local_tail++;
    r->pending++;
}

/* IORING_OP_WRITE of one buffer (ITER_UBUF: cheaper than a one-entry writev). */
static inline void vr_uring_prep_write(struct vr_uring *r, int fd, const void *buf, unsigned len,
                                       uint64_t user_data)
{
    vr_uring_prep_rw(r, IORING_OP_WRITE, fd, (const struct iovec *)buf, len, user_data);
    /* prep_rw's addr/len are the iovec array and its count; for WRITE they are
     * the buffer and its length, same SQE fields. */
}

/*
 * Publishes the queued SQEs and waits until all of them have completed (TAP
 * requests on an O_NONBLOCK fd complete inline, inside this one io_uring_enter).
 * 0 or -errno; on failure the requests the kernel did not take are withdrawn
 * (sq.tail moved back), so the caller knows none of them will run, and
 * *submitted says how many did.
 */
static inline int vr_uring_submit_wait(struct vr_uring *r, unsigned *submitted)
{
    unsigned want = r->pending, done = 0;

    *submitted = 0;
    if (!want)
        return 0;
    /* release: the SQEs are written before the tail that hands them over. */
    __atomic_store_n(r->sq_tail, r->sq_local_tail, __ATOMIC_RELEASE);
    while (done < want) {
        int n = vr_uring_sys_enter(r->fd, want - done, want, IORING_ENTER_GETEVENTS);

        if (n < 0) {
            int err = errno;

            if (err == EINTR || err == EAGAIN || err == EBUSY) {
                /* EINTR may come after submitting: recount from sq.head. */
                done = want - (r->sq_local_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE));
                if (err != EINTR && done == 0)
                    break;
                continue;
            }
            done = want - (r->sq_local_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE));
            r->sq_local_tail -= want - done;
            __atomic_store_n(r->sq_tail, r->sq_local_tail, __ATOMIC_RELEASE);
            r->pending = 0;
            *submitted = done;
            return -err;
        }
        done += (unsigned)n;
    }
    if (done < want) {
        r->sq_local_tail -= want - done;
        __atomic_store_n(r->sq_tail, r->sq_local_tail, __ATOMIC_RELEASE);
        r->pending = 0;
        *submitted = done;
        return -EAGAIN;
    }
    r->pending = 0;
    *submitted = done;
    /* Wait for the completions not yet posted (only if a request went async). */
    for (;;) {
        unsigned ready = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) - *r->cq_head;

        if (ready >= want)
            return 0;
        if (vr_uring_sys_enter(r->fd, 0, want, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR &&
            errno != EAGAIN)
            return -errno;
    }
}

/*
 * Withdraws the SQEs queued since the last submit: they were never published
 * (sq.tail still excludes them), so the kernel never sees them. For a burst cut
 * short (a fault while it was being assembled) whose requests point into
 * memory that may be gone.
 */
static inline void vr_uring_discard(struct vr_uring *r)
{
    r->sq_local_tail -= r->pending;
    r->pending = 0;
}

/* Next completion, or NULL. vr_uring_cqe_seen() after reading it. */
static inline struct io_uring_cqe *vr_uring_peek(struct vr_uring *r)
{
    unsigned head = *r->cq_head;

    /* acquire: the CQE is read only after the tail that covers it. */
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
        return NULL;
    return &r->cqes[head & r->cq_mask];
}

static inline void vr_uring_cqe_seen(struct vr_uring *r)
{
    /* release: done reading the CQE before the kernel may reuse its slot. */
    __atomic_store_n(r->cq_head, *r->cq_head + 1, __ATOMIC_RELEASE);
}

#endif /* VR_URING_H */
