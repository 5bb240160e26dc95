/*
 * worker.c — the worker thread of a queue pair: the epoll loop that drives
 * net_tx.c and net_rx.c, where it parks while paused, SIGBUS recovery, the TAP
 * I/O mode (io_uring or one syscall per frame) and busy polling. The entry
 * points that create, configure, pause and query a queue pair are in
 * qp_control.c.
 *
 * Threading contract (vhostd.h): configuration changes happen only while the
 * control plane holds the worker paused; the worker takes the mutex only when
 * its control eventfd fires, never on the datapath. epoll is level-triggered:
 * a kick eventfd is drained when it fires, and the TAP fd is watched only while
 * RX wants frames (ring ready + enabled + guest buffers available), so nothing
 * can spin: a level-triggered fd nobody reads would wake the loop for ever.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "vr_internal.h"

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

/*
 * Consumes a kick epoll reported. If the frontend's kick fd is blocking and the
 * frontend drained the counter itself between epoll and this read, the read
 * sleeps until the control plane's nudge (EINTR), and the vq stops.
 */
static void vr_drain_kick(struct vr_qp *qp, int which)
{
    uint64_t v;
    int fd = qp->kick_watched[which];
    ssize_t r;

    if (fd < 0)
        return;
    r = read(fd, &v, sizeof(v));
    if (r == (ssize_t)sizeof(v))
        qp->vq[which].stats.kicks++;
    else if (r < 0 && errno == EINTR)
        vr_vq_set_broken(qp, &qp->vq[which], VR_BROKEN_NOTIFY, VR_NOTIFY_KICK);
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
pthread_once_t vr_signals_once = PTHREAD_ONCE_INIT;

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

/* VR_SIG_NUDGE: delivery itself is the point (a sleeping syscall returns EINTR). */
static void vr_on_nudge(int sig)
{
    (void)sig;
}

void vr_install_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = vr_on_sigbus;
    /* NODEFER: the jump leaves the handler without sigreturn; SIGBUS must stay unblocked. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &vr_prev_bus);

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vr_on_nudge;
    sa.sa_flags = 0;                    /* no SA_RESTART: the interrupted syscall fails */
    sigemptyset(&sa.sa_mask);
    sigaction(VR_SIG_NUDGE, &sa, NULL);
}

/*
 * One round of bounded bursts, alternating so neither direction starves the other.
 * Guest memory is touched only in here: a SIGBUS lands back at the sigsetjmp
 * (nothing local changes after it), and both vqs of the pair stop. The burst it
 * interrupted may hold work that points into the lost memory: RX chains popped
 * for a frame (the stash) and TX requests prepared for io_uring but not yet
 * submitted. Both are dropped here, before anything else runs: submitted later
 * (or read into) they would write the lost guest's frames, or whatever the
 * daemon maps at those addresses next, to the TAP or into a later guest.
 */
static void vr_bursts(struct vr_qp *qp, bool *tx_more, bool *rx_more)
{
    sigjmp_buf fault;

    if (sigsetjmp(fault, 0)) {
        vr_fault_jmp = NULL;
        vr_rx_stash_forget(qp);
        vr_uring_discard(&qp->ring);
        vr_log_flush(qp);               /* marks for the writes made before the fault */
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

/* Test-only (vhostd.h): one round of bursts on the calling thread, as the worker
 * runs them, SIGBUS recovery included. */
int vr_qp_test_burst(struct vr_qp *qp)
{
    bool tx = true, rx = true, paused;

    if (!qp)
        return -EINVAL;
    pthread_mutex_lock(&qp->lock);
    paused = qp->pause_req > 0 && qp->parked;
    pthread_mutex_unlock(&qp->lock);
    if (!paused)
        return -EBUSY;
    vr_bursts(qp, &tx, &rx);
    return (tx ? 1 : 0) | (rx ? 2 : 0);
}

/* ---------------------------------------------------------- TAP I/O mode */

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
    bool want = qp->io_mode == VR_IO_URING;

    qp->io_mode = VR_IO_SYSCALL;
    qp->io_error = 0;
    memset(&qp->ring, 0, sizeof(qp->ring));
    qp->ring.fd = qp->ring.reg_fd = -1;
    if (qp->tap_fd >= 0 && want) {
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

void *vr_worker(void *arg)
{
    struct vr_qp *qp = arg;
    struct epoll_event evs[8];
    bool tx_more = false, rx_more = false, stop = false;
    uint64_t poll_until = 0;            /* busy poll: deadline of the current window */
    sigset_t bus;

    /* Workers start with every signal blocked; a synchronous SIGBUS while blocked
     * would kill the process, so this one is let through to vr_on_sigbus, and
     * the control plane's nudge to vr_on_nudge. */
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    sigaddset(&bus, VR_SIG_NUDGE);
    pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
    vr_io_init(qp);

    while (!stop) {
        bool polling = false;
        uint32_t stall;
        int n;

        stall = __atomic_exchange_n(&qp->test_stall_ms, 0, __ATOMIC_ACQ_REL);
        if (stall) {                    /* vr_qp_test_stall(): a worker that will not park */
            uint64_t until = vr_now_ns() + (uint64_t)stall * 1000000u;

            while (vr_now_ns() < until)
                ;
        }

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
