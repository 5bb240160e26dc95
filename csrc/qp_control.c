/*
 * qp_control.c — the control-plane API of a queue pair (vhostd.h): creating it
 * with its worker thread (worker.c) and freeing it, pause/resume, the
 * vr_qp_set_* configuration entry points (features, MTU, and per vq what the
 * vhost-user SET_VRING_* requests carry), ring mapping, vq reset, counters,
 * busy-poll and CPU settings, and the diagnostics vhostctl reads.
 *
 * Threading contract (vhostd.h): every configuration call returns -EBUSY unless
 * the worker is parked (VR_CHECK_PAUSED_VQ), so it never races the datapath;
 * pause/resume and stop reach the worker through its control eventfd and the
 * qp mutex. The diagnostics read worker-owned fields without pausing or locking.
 */
#define _GNU_SOURCE                     /* pthread_setaffinity_np, CPU_SET */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vr_internal.h"

/* ----------------------------------------------------------- control plane API */

static bool vr_is_paused(struct vr_qp *qp)
{
    bool p;

    pthread_mutex_lock(&qp->lock);
    p = qp->pause_req > 0 && qp->parked;
    pthread_mutex_unlock(&qp->lock);
    return p;
}

#define VR_CHECK_PAUSED_VQ(qp, which)                                   \
    do {                                                                \
        if (!(qp) || ((which) != VR_RX && (which) != VR_TX))            \
            return -EINVAL;                                             \
        if (!vr_is_paused(qp))                                          \
            return -EBUSY;                                              \
    } while (0)

static const struct vr_ring_ops *vr_ops_for(uint64_t features)
{
    return (features >> VR_F_RING_PACKED) & 1 ? &vr_packed_ops : &vr_split_ops;
}

static void vr_vq_init(struct vr_vq *vq, uint64_t features)
{
    memset(vq, 0, sizeof(*vq));
    vq->kick_fd = vq->call_fd = vq->err_fd = -1;
    vq->ops = vr_ops_for(features);
    vq->ops->init_state(vq);
}

/*
 * Drops what a vq's worker state may still hold from before (RX stash, TX
 * requests not submitted). Parked, both are empty unless a fault cut a burst
 * short; the ring state is about to be replaced either way, and nothing that
 * points into the old ring or memory may survive into the new one.
 */
static void vr_qp_forget_inflight(struct vr_qp *qp, int which)
{
    if (which == VR_RX) {
        qp->stash_first = qp->stash_count = qp->stash_iov_end = 0;
        qp->stash_bytes = 0;
    } else {
        vr_uring_discard(&qp->ring);
    }
}

/*
 * Bytes of guest buffers an RX frame may need with MRG_RXBUF: the largest frame
 * the TAP can hand us with the offloads the guest accepted (TUNSETOFFLOAD only
 * enables those), plus the vnet header. 65550 covers a 64 KiB GSO frame with its
 * Ethernet and VLAN headers, as Linux's virtio-net sizes its "big packets".
 */
static void vr_qp_update_rx_need(struct vr_qp *qp)
{
    const uint64_t gso = (1ull << VR_F_GUEST_TSO4) | (1ull << VR_F_GUEST_TSO6) |
                         (1ull << VR_F_GUEST_UFO) | (1ull << VR_F_GUEST_USO4) |
                         (1ull << VR_F_GUEST_USO6);
    uint32_t frame = qp->mtu + 14 + 4;          /* Ethernet + one VLAN tag */

    if (frame < 1518)
        frame = 1518;
    if (qp->features & gso)
        frame = 65550;
    qp->rx_need = frame + qp->vnet_hdr_len;
}

struct vr_qp *vr_qp_new(struct vr_mem *mem, int tap_fd, int io_mode)
{
    struct vr_qp *qp;
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = VR_EV_CTRL };
    struct stat st;
    sigset_t all, old;
    int err;

    if (!mem || (io_mode != VR_IO_SYSCALL && io_mode != VR_IO_URING)) {
        errno = EINVAL;
        return NULL;
    }
    qp = aligned_alloc(64, sizeof(*qp));  /* tx_bounce is cache-line aligned */
    if (!qp)
        return NULL;
    memset(qp, 0, sizeof(*qp));
    qp->tx_copy_max = VR_TX_COPY_DEFAULT;
    qp->io_mode = io_mode;              /* what to try; vr_io_init() records what it got */
    qp->mem = mem;
    qp->tap_fd = tap_fd;
    qp->tap_is_socket = tap_fd >= 0 && fstat(tap_fd, &st) == 0 && S_ISSOCK(st.st_mode);
    qp->vnet_hdr_len = 12;
    qp->mtu = 1500;
    qp->cpu = -1;
    qp->ring.fd = qp->ring.reg_fd = -1;
    vr_qp_update_rx_need(qp);
    vr_vq_init(&qp->vq[VR_RX], 0);
    vr_vq_init(&qp->vq[VR_TX], 0);
    qp->kick_watched[VR_RX] = qp->kick_watched[VR_TX] = -1;
    qp->epfd = epoll_create1(EPOLL_CLOEXEC);
    qp->ctrl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    qp->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (qp->epfd < 0 || qp->ctrl_fd < 0 || qp->event_fd < 0 ||
        epoll_ctl(qp->epfd, EPOLL_CTL_ADD, qp->ctrl_fd, &ev) < 0) {
        err = errno;
        goto fail_fds;
    }
    pthread_mutex_init(&qp->lock, NULL);
    {
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);    /* vr_qp_pause's deadline */
        pthread_cond_init(&qp->cond, &ca);
        pthread_condattr_destroy(&ca);
    }

    pthread_once(&vr_signals_once, vr_install_signals);
    /* The worker takes no signals (but SIGBUS, see vr_worker): they belong to the
     * Python main thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    err = pthread_create(&qp->thread, NULL, vr_worker, qp);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        pthread_cond_destroy(&qp->cond);
        pthread_mutex_destroy(&qp->lock);
        goto fail_fds;
    }
    pthread_mutex_lock(&qp->lock);
    while (!qp->io_ready)
        pthread_cond_wait(&qp->cond, &qp->lock);
    pthread_mutex_unlock(&qp->lock);
    return qp;

fail_fds:
    if (qp->epfd >= 0)
        close(qp->epfd);
    if (qp->ctrl_fd >= 0)
        close(qp->ctrl_fd);
    if (qp->event_fd >= 0)
        close(qp->event_fd);
    free(qp);
    errno = err;
    return NULL;
}

static void vr_ctrl_signal(struct vr_qp *qp)
{
    uint64_t one = 1;
    ssize_t r = write(qp->ctrl_fd, &one, sizeof(one));

    (void)r;
}

int vr_qp_free(struct vr_qp *qp)
{
    bool stuck;

    if (!qp)
        return 0;
    /* Park the worker first (nudging it out of a blocking eventfd), so that the
     * join below cannot wait for ever; a stuck worker is left alone. */
    pthread_mutex_lock(&qp->lock);
    stuck = qp->stuck && !qp->parked;
    pthread_mutex_unlock(&qp->lock);
    if (stuck || (!qp->stuck && vr_qp_pause(qp) == -ETIMEDOUT))
        return -EBUSY;
    pthread_mutex_lock(&qp->lock);
    qp->stop = true;
    pthread_cond_broadcast(&qp->cond);
    pthread_mutex_unlock(&qp->lock);
    vr_ctrl_signal(qp);
    pthread_join(qp->thread, NULL);
    close(qp->epfd);
    close(qp->ctrl_fd);
    close(qp->event_fd);
    pthread_cond_destroy(&qp->cond);
    pthread_mutex_destroy(&qp->lock);
    free(qp);
    return 0;
}

/* vr_qp_pause(): how long a worker may take to park, and how often it is nudged
 * meanwhile. A burst is bounded (VR_BURST chains each way, non-blocking TAP
 * I/O), so a healthy worker parks within milliseconds even on a loaded host. */
static unsigned vr_pause_timeout_ms = 5000;
#define VR_NUDGE_INTERVAL_MS 20

void vr_set_pause_timeout(unsigned ms)
{
    __atomic_store_n(&vr_pause_timeout_ms, ms ? ms : 1, __ATOMIC_RELAXED);
}

static struct timespec vr_ts_after_ms(const struct timespec *t, unsigned ms)
{
    struct timespec r = *t;

    r.tv_sec += ms / 1000;
    r.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (r.tv_nsec >= 1000000000L) {
        r.tv_sec++;
        r.tv_nsec -= 1000000000L;
    }
    return r;
}

static bool vr_ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/*
 * The control plane must never wait for a worker without bound: it is the
 * daemon's only event loop. The worker parks at its next control event; what
 * can keep it from getting there is a syscall sleeping on an fd the frontend
 * controls (an eventfd it made blocking, see vr_efd_signal), which the nudge
 * interrupts, or a bug, which nothing here can fix: the pair is then stuck,
 * and the caller fails its port instead of the daemon.
 */
int vr_qp_pause(struct vr_qp *qp)
{
    struct timespec now, deadline, next;

    if (!qp)
        return -EINVAL;
    pthread_mutex_lock(&qp->lock);
    if (qp->stop) {
        pthread_mutex_unlock(&qp->lock);
        return -ESHUTDOWN;
    }
    if (qp->stuck) {
        pthread_mutex_unlock(&qp->lock);
        return -ETIMEDOUT;
    }
    if (qp->pause_req++ == 0 && !qp->parked)
        vr_ctrl_signal(qp);
    clock_gettime(CLOCK_MONOTONIC, &now);
    deadline = vr_ts_after_ms(&now, __atomic_load_n(&vr_pause_timeout_ms, __ATOMIC_RELAXED));
    while (!qp->parked) {
        next = vr_ts_after_ms(&now, VR_NUDGE_INTERVAL_MS);
        if (vr_ts_before(&deadline, &next))
            next = deadline;
        pthread_cond_timedwait(&qp->cond, &qp->lock, &next);
        if (qp->parked)
            break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (!vr_ts_before(&now, &deadline)) {
            /* The pause request stays counted: should the worker ever get back
             * to its loop, it parks and stays parked until vr_qp_free(). */
            qp->stuck = true;
            pthread_mutex_unlock(&qp->lock);
            return -ETIMEDOUT;
        }
        pthread_kill(qp->thread, VR_SIG_NUDGE);
        qp->nudges++;
    }
    pthread_mutex_unlock(&qp->lock);
    return 0;
}

int vr_qp_parked(struct vr_qp *qp)
{
    int p;

    if (!qp)
        return -EINVAL;
    pthread_mutex_lock(&qp->lock);
    p = qp->parked;
    pthread_mutex_unlock(&qp->lock);
    return p;
}

int vr_qp_resume(struct vr_qp *qp)
{
    int r = 0;

    if (!qp)
        return -EINVAL;
    pthread_mutex_lock(&qp->lock);
    if (qp->pause_req == 0)
        r = -EINVAL;
    else if (--qp->pause_req == 0)
        pthread_cond_broadcast(&qp->cond);
    pthread_mutex_unlock(&qp->lock);
    return r;
}

/*
 * Features select the ring kind of both vqs. When the kind changes, the ring
 * state restarts in the new kind's initial state (packed: wrap counters 1) and
 * the rings are re-translated with the new layout; a frontend sends SET_FEATURES
 * before the vring setup, so nothing is lost.
 */
int vr_qp_set_features(struct vr_qp *qp, uint64_t features, uint32_t vnet_hdr_len)
{
    const struct vr_ring_ops *ops;

    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    if (vnet_hdr_len != 10 && vnet_hdr_len != 12)
        return -EINVAL;
    if (((features >> VR_F_MRG_RXBUF) & 1) && vnet_hdr_len != 12)
        return -EINVAL;                 /* §5.1.6: num_buffers is part of the header */
    ops = vr_ops_for(features);
    qp->features = features;
    qp->vnet_hdr_len = vnet_hdr_len;
    qp->log_on = qp->log && ((features >> VR_F_LOG_ALL) & 1);
    vr_qp_update_rx_need(qp);
    for (int w = 0; w < 2; w++) {
        struct vr_vq *vq = &qp->vq[w];

        if (vq->ops == ops)
            continue;
        vr_qp_forget_inflight(qp, w);
        vq->ops = ops;
        ops->init_state(vq);
        if (vq->addr_set)
            ops->map(qp->mem, vq);
    }
    return 0;
}

int vr_qp_set_mtu(struct vr_qp *qp, uint32_t mtu)
{
    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    if (mtu < 68 || mtu > 65535)
        return -EINVAL;
    qp->mtu = mtu;
    vr_qp_update_rx_need(qp);
    return 0;
}

/* Split rings need a power of two (checked again when mapping, in case the
 * features change afterwards); packed rings any size up to 32768. */
int vr_qp_set_num(struct vr_qp *qp, int which, uint32_t num)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    if (num == 0 || num > VR_MAX_QUEUE_SIZE)
        return -EINVAL;
    if (qp->vq[which].ops == &vr_split_ops && (num & (num - 1)))
        return -EINVAL;
    qp->vq[which].num = num;
    qp->vq[which].mapped = false;       /* ring sizes changed: vr_qp_map() again */
    return 0;
}

int vr_qp_set_addr(struct vr_qp *qp, int which, uint64_t desc_uva, uint64_t avail_uva,
                   uint64_t used_uva)
{
    struct vr_vq *vq;

    VR_CHECK_PAUSED_VQ(qp, which);
    vq = &qp->vq[which];
    vq->desc_uva = desc_uva;
    vq->avail_uva = avail_uva;
    vq->used_uva = used_uva;
    vq->addr_set = true;
    vq->mapped = false;                 /* vr_qp_map() translates them */
    return 0;
}

int vr_qp_set_base(struct vr_qp *qp, int which, uint32_t base)
{
    int r;

    VR_CHECK_PAUSED_VQ(qp, which);
    vr_qp_forget_inflight(qp, which);
    r = qp->vq[which].ops->set_base(&qp->vq[which], base);
    if (r == 0)
        vr_vq_publish(&qp->vq[which]);
    return r;
}

int vr_qp_get_base(struct vr_qp *qp, int which, uint32_t *base)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    if (!base)
        return -EINVAL;
    *base = qp->vq[which].ops->get_base(&qp->vq[which]);
    return 0;
}

int vr_qp_set_kick(struct vr_qp *qp, int which, int fd)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    /* Stop watching the old fd now: the caller closes it right after we return. */
    if (qp->kick_watched[which] >= 0) {
        epoll_ctl(qp->epfd, EPOLL_CTL_DEL, qp->kick_watched[which], NULL);
        qp->kick_watched[which] = -1;
    }
    qp->vq[which].kick_fd = fd < 0 ? -1 : fd;
    return 0;
}

int vr_qp_set_call(struct vr_qp *qp, int which, int fd)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    qp->vq[which].call_fd = fd < 0 ? -1 : fd;
    return 0;
}

int vr_qp_set_err(struct vr_qp *qp, int which, int fd)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    qp->vq[which].err_fd = fd < 0 ? -1 : fd;
    return 0;
}

int vr_qp_set_started(struct vr_qp *qp, int which, int started)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    qp->vq[which].started = started != 0;
    return 0;
}

int vr_qp_set_enabled(struct vr_qp *qp, int which, int enabled)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    qp->vq[which].enabled = enabled != 0;
    return 0;
}

int vr_qp_map(struct vr_qp *qp)
{
    int r, ret = 0;

    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    for (int w = 0; w < 2; w++) {
        r = qp->vq[w].ops->map(qp->mem, &qp->vq[w]);
        if (r < 0 && ret == 0)
            ret = r;
    }
    return ret;
}

const struct vr_vq_stats *vr_qp_stats(struct vr_qp *qp, int which)
{
    if (!qp || (which != VR_RX && which != VR_TX))
        return NULL;
    return &qp->vq[which].stats;
}

int vr_qp_reset_vq(struct vr_qp *qp, int which)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    /* Unwatch the kick fd first: the caller closes it once we return. */
    if (qp->kick_watched[which] >= 0) {
        epoll_ctl(qp->epfd, EPOLL_CTL_DEL, qp->kick_watched[which], NULL);
        qp->kick_watched[which] = -1;
    }
    vr_qp_forget_inflight(qp, which);
    vr_vq_init(&qp->vq[which], qp->features);
    return 0;
}

int vr_qp_mapped(struct vr_qp *qp, int which)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    return qp->vq[which].mapped;
}

int vr_qp_event_fd(struct vr_qp *qp)
{
    return qp ? qp->event_fd : -EINVAL;
}

int vr_qp_io_mode(struct vr_qp *qp)
{
    return qp ? qp->io_mode : -EINVAL;
}

int vr_qp_io_error(struct vr_qp *qp)
{
    return qp ? qp->io_error : -EINVAL;
}

int vr_qp_set_tx_copy_max(struct vr_qp *qp, uint32_t bytes)
{
    VR_CHECK_PAUSED_VQ(qp, VR_TX);
    if (bytes > VR_TX_COPY_LIMIT)
        return -EINVAL;
    qp->tx_copy_max = bytes;
    return 0;
}

int vr_qp_set_log(struct vr_qp *qp, uint64_t log, uint64_t words)
{
    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    if ((log && !words) || (log & 7))
        return -EINVAL;
    qp->log_cache_n = 0;                /* empty while parked: every burst flushes it */
    qp->log = (volatile uint64_t *)(uintptr_t)log;
    qp->log_words = log ? words : 0;
    qp->log_on = qp->log && vr_has_feature(qp, VR_F_LOG_ALL);
    return 0;
}

int vr_qp_set_log_addr(struct vr_qp *qp, int which, int log, uint64_t log_guest_addr)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    qp->vq[which].log_addr_set = log != 0;
    qp->vq[which].log_guest_addr = log ? log_guest_addr : 0;
    return 0;
}

int vr_qp_set_saved(struct vr_qp *qp, int which, struct vr_vq_saved *saved)
{
    VR_CHECK_PAUSED_VQ(qp, which);
    qp->vq[which].saved = saved;
    if (saved)
        vr_vq_publish(&qp->vq[which]);
    return 0;
}

int vr_qp_set_capture(struct vr_qp *qp, struct vr_capture *c)
{
    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    qp->capture = c;
    return 0;
}

uint64_t vr_qp_log_marks(struct vr_qp *qp)
{
    return qp ? __atomic_load_n(&qp->log_marks, __ATOMIC_RELAXED) : 0;
}

uint64_t vr_qp_log_overflow(struct vr_qp *qp)
{
    return qp ? __atomic_load_n(&qp->log_overflow, __ATOMIC_RELAXED) : 0;
}

int vr_qp_set_busy_poll(struct vr_qp *qp, uint32_t usecs)
{
    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    if (usecs > VR_MAX_BUSY_POLL_US)
        return -EINVAL;
    qp->busy_poll_us = usecs;
    return 0;
}

/*
 * Pins the worker to `cpu` (-1: every CPU the process may use). EINVAL for a
 * CPU that does not exist, is offline or is outside the process's cpuset;
 * EPERM if a sandbox forbids sched_setaffinity.
 */
int vr_qp_set_cpu(struct vr_qp *qp, int cpu)
{
    cpu_set_t set;
    int r;

    if (!qp || cpu < -1 || cpu >= CPU_SETSIZE)
        return -EINVAL;
    if (cpu < 0) {
        if (sched_getaffinity(0, sizeof(set), &set) < 0)
            return -errno;
    } else {
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
    }
    r = pthread_setaffinity_np(qp->thread, sizeof(set), &set);
    if (r)
        return -r;
    qp->cpu = cpu;
    return 0;
}

/* ------------------------------------------------------------- diagnostics */

int vr_qp_test_stall(struct vr_qp *qp, unsigned ms)
{
    if (!qp)
        return -EINVAL;
    __atomic_store_n(&qp->test_stall_ms, ms, __ATOMIC_RELEASE);
    return 0;
}

int vr_qp_inflight(struct vr_qp *qp)
{
    VR_CHECK_PAUSED_VQ(qp, VR_RX);
    return (int)(qp->stash_count + qp->ring.pending);
}

uint64_t vr_qp_tx_copied(struct vr_qp *qp)
{
    return qp->tx_copied;
}

uint64_t vr_qp_idle_waits(struct vr_qp *qp)
{
    return __atomic_load_n(&qp->idle_waits, __ATOMIC_ACQUIRE);
}

/* Worker-owned fields read from another thread: relaxed single loads, no locks,
 * so that a diagnostic never waits for (or on) a stuck worker. */
#define VR_PEEK(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

int vr_qp_vq_state(struct vr_qp *qp, int which, struct vr_vq_state *out)
{
    struct vr_vq *vq;
    bool packed;

    if (!qp || (which != VR_RX && which != VR_TX) || !out)
        return -EINVAL;
    vq = &qp->vq[which];
    packed = VR_PEEK(vq->ops) == &vr_packed_ops;
    memset(out, 0, sizeof(*out));
    out->last_avail = VR_PEEK(vq->last_avail_idx);
    out->used = VR_PEEK(vq->used_idx);
    if (packed) {
        out->last_avail = (uint16_t)(out->last_avail | (uint16_t)VR_PEEK(vq->avail_wrap) << 15);
        out->used = (uint16_t)(out->used | (uint16_t)VR_PEEK(vq->used_wrap) << 15);
    }
    out->published_used = VR_PEEK(vq->published_used_idx);
    out->signalled_used = VR_PEEK(vq->signalled_used);
    out->signalled_valid = VR_PEEK(vq->signalled_valid);
    out->device_event_flags = VR_PEEK(vq->device_event_flags);
    out->ready = VR_PEEK(vq->num) && VR_PEEK(vq->mapped) && VR_PEEK(vq->started) && !VR_PEEK(vq->stats.broken);
    out->kick_watched = VR_PEEK(qp->kick_watched[which]) >= 0;
    out->tap_watched = VR_PEEK(qp->tap_watched);
    out->tap_dead = VR_PEEK(qp->tap_dead);
    out->idle_waits = __atomic_load_n(&qp->idle_waits, __ATOMIC_ACQUIRE);
    return 0;
}
