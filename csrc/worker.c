/*
 * worker.c — one queue pair and its worker thread: configuration entry points,
 * pause/resume, and the epoll loop that drives net_tx.c and net_rx.c.
 *
 * Threading contract (vhostd.h): configuration changes happen only while the
 * control plane holds the worker paused; the worker takes the mutex only when
 * its control eventfd fires, never on the datapath. epoll is level-triggered:
 * a kick eventfd is drained when it fires, and the TAP fd is watched only while
 * RX wants frames (ring ready + enabled + guest buffers available), so nothing
 * can spin (REFERENCE "Datapath traps").
 */
#define _GNU_SOURCE                     /* pthread_setaffinity_np, CPU_SET */
#include <errno.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vr_internal.h"

/* --------------------------------------------------- shared by both ring kinds */

void vr_efd_signal(int fd)
{
    uint64_t one = 1;

    if (fd >= 0) {
        ssize_t r = write(fd, &one, sizeof(one));
        (void)r;    /* EAGAIN: the counter is already nonzero, the reader will wake */
    }
}

void vr_vq_set_broken(struct vr_qp *qp, struct vr_vq *vq, uint32_t why, uint32_t detail)
{
    if (vq->stats.broken)
        return;
    vq->stats.broken_detail = detail;
    vq->stats.drop_bad_desc++;
    /* release: the detail is visible before the reason the control plane polls. */
    __atomic_store_n(&vq->stats.broken, why, __ATOMIC_RELEASE);
    vr_efd_signal(vq->err_fd);
    vr_efd_signal(qp->event_fd);
}

/* ------------------------------------------------------------ epoll set sync */

static void vr_watch_kick(struct vr_qp *qp, int which)
{
    struct vr_vq *vq = &qp->vq[which];
    int want = vr_vq_ready(vq) && vq->kick_fd >= 0 ? vq->kick_fd : -1;
    struct epoll_event ev = { .events = EPOLLIN };

    if (qp->kick_watched[which] == want)
        return;
    if (qp->kick_watched[which] >= 0)
        epoll_ctl(qp->epfd, EPOLL_CTL_DEL, qp->kick_watched[which], NULL);
    qp->kick_watched[which] = -1;
    if (want >= 0) {
        ev.data.u32 = which == VR_RX ? VR_EV_KICK_RX : VR_EV_KICK_TX;
        if (epoll_ctl(qp->epfd, EPOLL_CTL_ADD, want, &ev) == 0)
            qp->kick_watched[which] = want;
    }
}

/*
 * TAP watched or not. Deleting (rather than MOD to no events) also silences
 * EPOLLHUP/EPOLLERR, which epoll reports even for an empty event mask.
 */
static void vr_watch_tap(struct vr_qp *qp, bool want)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = VR_EV_TAP };

    want = want && qp->tap_fd >= 0 && !qp->tap_dead;
    if (want == qp->tap_watched)
        return;
    if (want)
        qp->tap_watched = epoll_ctl(qp->epfd, EPOLL_CTL_ADD, qp->tap_fd, &ev) == 0;
    else {
        epoll_ctl(qp->epfd, EPOLL_CTL_DEL, qp->tap_fd, NULL);
        qp->tap_watched = false;
    }
}

static bool vr_rx_wants_tap(const struct vr_qp *qp)
{
    const struct vr_vq *rx = &qp->vq[VR_RX];

    return vr_vq_ready(rx) && rx->enabled;
}

/* ------------------------------------------------------------------- worker */

static void vr_drain_kick(struct vr_qp *qp, int which)
{
    uint64_t v;
    int fd = qp->kick_watched[which];

    if (fd >= 0 && read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
        qp->vq[which].stats.kicks++;
}

/* Parks while paused. Returns true if the worker was parked (state may have changed). */
static bool vr_handle_control(struct vr_qp *qp, bool *stop)
{
    uint64_t v;
    bool was_parked = false;
    ssize_t r = read(qp->ctrl_fd, &v, sizeof(v));

    (void)r;
    pthread_mutex_lock(&qp->lock);
    while (qp->pause_req > 0 && !qp->stop) {
        if (!qp->parked) {
            qp->parked = true;
            pthread_cond_broadcast(&qp->cond);
        }
        was_parked = true;
        pthread_cond_wait(&qp->cond, &qp->lock);
    }
    qp->parked = false;
    *stop = qp->stop;
    pthread_mutex_unlock(&qp->lock);
    return was_parked;
}

/*
 * SIGBUS: guest memory is a file the frontend still owns. If it shrinks the file
 * after SET_MEM_TABLE (a hostile or broken frontend; unsealed hugetlbfs and /dev/shm
 * files allow it), touching the lost pages raises SIGBUS in the worker. That must
 * cost the guest its rings, not the daemon its life: the handler jumps back into
 * the faulting worker's loop, which marks both vqs broken. Faults anywhere else
 * go to whatever handler was there before (or the default action).
 */
static __thread sigjmp_buf *vr_fault_jmp;
static struct sigaction vr_prev_bus;
static pthread_once_t vr_bus_once = PTHREAD_ONCE_INIT;

static void vr_on_sigbus(int sig, siginfo_t *si, void *uc)
{
    if (vr_fault_jmp)
        siglongjmp(*vr_fault_jmp, 1);
    if ((vr_prev_bus.sa_flags & SA_SIGINFO) && vr_prev_bus.sa_sigaction) {
        vr_prev_bus.sa_sigaction(sig, si, uc);
        return;
    }
    if (!(vr_prev_bus.sa_flags & SA_SIGINFO) && vr_prev_bus.sa_handler != SIG_DFL &&
        vr_prev_bus.sa_handler != SIG_IGN) {
        vr_prev_bus.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

static void vr_install_bus_handler(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = vr_on_sigbus;
    /* NODEFER: the jump leaves the handler without sigreturn; SIGBUS must stay unblocked. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &vr_prev_bus);
}

/*
 * One round of bounded bursts, alternating so neither direction starves the other.
 * Guest memory is touched only in here: a SIGBUS lands back at the sigsetjmp
 * (nothing local changes after it), and both vqs of the pair stop.
 */
static void vr_bursts(struct vr_qp *qp, bool *tx_more, bool *rx_more)
{
    sigjmp_buf fault;

    if (sigsetjmp(fault, 0)) {
        vr_fault_jmp = NULL;
        vr_vq_set_broken(qp, &qp->vq[VR_RX], VR_BROKEN_MEMORY, 0);
        vr_vq_set_broken(qp, &qp->vq[VR_TX], VR_BROKEN_MEMORY, 0);
        vr_watch_tap(qp, false);
        *tx_more = *rx_more = false;
        return;
    }
    vr_fault_jmp = &fault;
    if (*tx_more)
        *tx_more = vr_tx_process(qp);
    if (*rx_more) {
        enum vr_rx_state s = vr_rx_process(qp);

        *rx_more = s == VR_RX_MORE;
        vr_watch_tap(qp, s == VR_RX_MORE || s == VR_RX_TAP_EMPTY);
    }
    vr_fault_jmp = NULL;
}

/* ---------------------------------------------------------- TAP I/O mode */

static int vr_io_uring_allowed = 1;     /* vr_set_io_uring(); read by each new worker */
static unsigned vr_tx_copy_max = VR_TX_COPY_DEFAULT;   /* vr_set_tx_copy_max(); read by vr_qp_new() */

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

int vr_set_tx_copy_max(unsigned bytes)
{
    if (bytes > VR_TX_COPY_LIMIT)
        return -EINVAL;
    __atomic_store_n(&vr_tx_copy_max, bytes, __ATOMIC_RELAXED);
    return 0;
}

void vr_set_io_uring(int allowed)
{
    __atomic_store_n(&vr_io_uring_allowed, allowed != 0, __ATOMIC_RELAXED);
}

/*
 * Runs on the worker thread before anything else, so that the ring belongs to
 * it (SINGLE_ISSUER). io_uring_setup fails with ENOSYS on kernels without it and
 * with EPERM when sysctl kernel.io_uring_disabled or a seccomp filter forbids
 * it: the queue pair then uses one readv/writev per frame, which is always
 * correct. vr_qp_new() waits for the outcome.
 */
static void vr_io_init(struct vr_qp *qp)
{
    int r;

    qp->io_mode = VR_IO_SYSCALL;
    qp->io_error = 0;
    memset(&qp->ring, 0, sizeof(qp->ring));
    qp->ring.fd = qp->ring.reg_fd = -1;
    if (qp->tap_fd >= 0 && __atomic_load_n(&vr_io_uring_allowed, __ATOMIC_RELAXED)) {
        r = vr_uring_init(&qp->ring, VR_BURST);
        if (r == 0) {
            vr_uring_register_fd(&qp->ring, qp->tap_fd);   /* optional: plain fd otherwise */
            qp->io_mode = VR_IO_URING;
        } else {
            qp->io_error = -r;
        }
    }
    pthread_mutex_lock(&qp->lock);
    qp->io_ready = true;
    pthread_cond_broadcast(&qp->cond);
    pthread_mutex_unlock(&qp->lock);
}

/* ------------------------------------------------------------- busy polling */

static inline uint64_t vr_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Frames and drops so far on both vqs: moves when a burst found work. */
static uint64_t vr_work_count(const struct vr_qp *qp)
{
    uint64_t n = 0;

    for (int w = 0; w < 2; w++) {
        const struct vr_vq_stats *s = &qp->vq[w].stats;

        n += s->packets + s->drop_ring_full + s->drop_tap_busy + s->drop_tap_error +
             s->drop_bad_hdr + s->drop_disabled;
    }
    return n;
}

static void *vr_worker(void *arg)
{
    struct vr_qp *qp = arg;
    struct epoll_event evs[8];
    bool tx_more = false, rx_more = false, stop = false;
    uint64_t poll_until = 0;            /* busy poll: deadline of the current window */
    sigset_t bus;

    /* Workers start with every signal blocked; a synchronous SIGBUS while blocked
     * would kill the process, so this one is let through to vr_on_sigbus. */
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
    vr_io_init(qp);

    while (!stop) {
        bool polling = false;
        int n;

        /*
         * Busy poll (busy_poll_us > 0): after a burst that moved frames, keep
         * looking at both rings and the TAP without sleeping for up to
         * busy_poll_us, so that the next frame needs no kick, no wake-up and no
         * call-to-wake latency. Each frame found re-arms the window; a window
         * with nothing in it ends in epoll as usual, so an idle port sleeps.
         */
        if (!tx_more && !rx_more && poll_until) {
            if (vr_now_ns() < poll_until)
                polling = true;
            else
                poll_until = 0;
        }
        if (tx_more || rx_more || polling) {
            n = epoll_wait(qp->epfd, evs, 8, 0);
        } else {
            __atomic_add_fetch(&qp->idle_waits, 1, __ATOMIC_RELEASE);
            n = epoll_wait(qp->epfd, evs, 8, -1);
        }

        if (n < 0 && errno != EINTR)
            n = 0;
        for (int k = 0; k < n; k++) {
            switch (evs[k].data.u32) {
            case VR_EV_CTRL:
                if (vr_handle_control(qp, &stop)) {
                    /* Config may have changed and kicks may have been lost
                     * across an fd change: resync, then service both rings.
                     * A TAP that hung up gets one more chance per resume. */
                    qp->tap_dead = false;
                    vr_watch_kick(qp, VR_RX);
                    vr_watch_kick(qp, VR_TX);
                    vr_watch_tap(qp, vr_rx_wants_tap(qp));
                    tx_more = rx_more = true;
                }
                break;
            case VR_EV_KICK_RX:
                vr_drain_kick(qp, VR_RX);
                rx_more = true;
                break;
            case VR_EV_KICK_TX:
                vr_drain_kick(qp, VR_TX);
                tx_more = true;
                break;
            case VR_EV_TAP:
                if (evs[k].events & (EPOLLHUP | EPOLLERR)) {
                    qp->tap_dead = true;
                    vr_watch_tap(qp, false);
                }
                rx_more = true;
                break;
            }
        }
        if (stop)
            break;
        if (qp->busy_poll_us) {
            uint64_t before = vr_work_count(qp);

            if (polling)
                tx_more = rx_more = true;
            vr_bursts(qp, &tx_more, &rx_more);
            if (vr_work_count(qp) != before)
                poll_until = vr_now_ns() + (uint64_t)qp->busy_poll_us * 1000u;
        } else {
            vr_bursts(qp, &tx_more, &rx_more);
        }
        /* A vq that broke stops being watched. */
        vr_watch_kick(qp, VR_RX);
        vr_watch_kick(qp, VR_TX);
    }
    /* Here, not in vr_qp_free(): a SINGLE_ISSUER ring accepts io_uring_register
     * (unregistering the TAP file) only from the thread that owns it. */
    vr_uring_free(&qp->ring);
    return NULL;
}

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

struct vr_qp *vr_qp_new(struct vr_mem *mem, int tap_fd)
{
    struct vr_qp *qp;
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = VR_EV_CTRL };
    struct stat st;
    sigset_t all, old;
    int err;

    if (!mem) {
        errno = EINVAL;
        return NULL;
    }
    qp = aligned_alloc(64, sizeof(*qp));  /* tx_bounce is cache-line aligned */
    if (!qp)
        return NULL;
    memset(qp, 0, sizeof(*qp));
    qp->tx_copy_max = __atomic_load_n(&vr_tx_copy_max, __ATOMIC_RELAXED);
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
    pthread_cond_init(&qp->cond, NULL);

    pthread_once(&vr_bus_once, vr_install_bus_handler);
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

void vr_qp_free(struct vr_qp *qp)
{
    if (!qp)
        return;
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
}

int vr_qp_pause(struct vr_qp *qp)
{
    if (!qp)
        return -EINVAL;
    pthread_mutex_lock(&qp->lock);
    if (qp->stop) {
        pthread_mutex_unlock(&qp->lock);
        return -ESHUTDOWN;
    }
    if (qp->pause_req++ == 0 && !qp->parked)
        vr_ctrl_signal(qp);
    while (!qp->parked)
        pthread_cond_wait(&qp->cond, &qp->lock);
    pthread_mutex_unlock(&qp->lock);
    return 0;
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
    vr_qp_update_rx_need(qp);
    for (int w = 0; w < 2; w++) {
        struct vr_vq *vq = &qp->vq[w];

        if (vq->ops == ops)
            continue;
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
    VR_CHECK_PAUSED_VQ(qp, which);
    return qp->vq[which].ops->set_base(&qp->vq[which], base);
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
