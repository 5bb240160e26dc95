/*
 * fuzz_rings.c — libFuzzer driver for the C datapath: split and packed ring
 * walkers (vring_split.c, vring_packed.c) and the TX/RX paths (net_tx.c,
 * net_rx.c) over guest memory laid out from the fuzz input.
 *
 * Built with clang -fsanitize=fuzzer,address,undefined together with every csrc C file
 * (scripts/fuzz.sh). The guest is the fuzzer: it owns every byte of guest
 * memory, so descriptors, chains, indirect tables, avail/used indices, event
 * suppression fields and vnet headers all come from the input.
 *
 * Guest memory (three memfd regions, uva = gpa + UVA_BASE as tests/driver
 * lays it out):
 *   R0 gpa 0x00000      64 KiB  \ adjacent in gpa, separate mappings: buffers
 *   R1 gpa 0x10000      64 KiB  / that cross them need two iovecs
 *   R2 gpa 0x100000000   4 KiB    far away (64-bit addresses)
 *
 * Input: struct fuzz_cfg (little-endian, packed), then an image copied to gpa 0
 * onwards (at most R0 + R1). fuzz/make_ring_seeds.py writes seeds in this format
 * from rings the tests' guest drivers (tests/driver) build.
 *
 * One input is one frontend on the fuzzer's one queue pair, which lives for the
 * whole run as a port's does in the daemon across frontends: both vqs reset
 * (vr_qp_reset_vq, a new frontend), configured through the public vr_qp_* API
 * while paused as the control plane does; then, still paused (the worker is
 * parked and touches nothing), `rounds` rounds of the bursts the worker loop
 * runs (vr_qp_test_burst: TX then RX, SIGBUS recovery included), with RX frames
 * queued on a socketpair standing in for the TAP (the stand-in the unit tests
 * use) and TX frames drained from it. Work per input is bounded: VR_BURST
 * chains per call, chain walks bounded by the queue size, at most 4 rounds.
 *
 * With FZ_TRUNCATE (bit 6 of cfg.rounds) the frontend shrinks region R1's
 * memfd to nothing once the rings are set up, before the first round (or the
 * worker phase): whatever a burst touches there faults in the middle of it
 * (SIGBUS), and the queue pair must come out with both vqs broken and nothing
 * left in flight. R1 is restored for the next input, the next frontend.
 *
 * With FZ_WORKER (bit 7 of cfg.rounds) the input then goes on through the
 * worker thread as in the daemon: resume, kick both rings, wait for the
 * worker's call/err signals (at most WORKER_WAIT_MS), pause again. This covers
 * the epoll loop (kick and TAP watching, resync after resume) at the price of
 * some timing dependence; the parked-ring checks apply the same way.
 *
 * With FZ_LOG (bit 5 of cfg.rounds) the dirty log is on (VHOST_F_LOG_ALL and a
 * one-word log covering R0 and R1): marks for R2 must be dropped, none may
 * land outside the log, and none may wait in the worker's cache while parked.
 *
 * Beyond the sanitizers, each round checks the invariant every parked ring
 * must satisfy: everything popped was pushed (and published) or given back, so
 * processing leaves the distance between the avail and used positions as
 * SET_VRING_BASE set it (not after a memory fault, which leaves the ring broken
 * mid-burst), and nothing is in flight: no RX chain stashed, no io_uring
 * request prepared but not submitted (vr_qp_inflight), broken queue or not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vr_internal.h"

#define UVA_BASE 0x7f0000000000ull
#define R0_GPA 0x0ull
#define R1_GPA 0x10000ull
#define R2_GPA 0x100000000ull
#define R01_SIZE 0x10000ull
#define R2_SIZE 0x1000ull
#define IMAGE_MAX (2 * R01_SIZE)
#define MAX_ROUNDS 4
#define FZ_WORKER 0x80                 /* cfg.rounds: then run the worker thread once */
#define FZ_TRUNCATE 0x40               /* cfg.rounds: the frontend shrinks R1 mid-input */
#define FZ_LOG 0x20                    /* cfg.rounds: dirty log on (LOG_ALL, a log covering R0+R1) */
#define WORKER_WAIT_MS 2

/* Feature selection (cfg.features bits) -> virtio bits */
#define FZ_PACKED (1u << 0)
#define FZ_EVENT_IDX (1u << 1)
#define FZ_INDIRECT (1u << 2)
#define FZ_MRG (1u << 3)
#define FZ_V1 (1u << 4)
#define FZ_CSUM (1u << 5)              /* CSUM + GUEST_CSUM */
#define FZ_HOST_GSO (1u << 6)          /* HOST_TSO4/6, ECN, UFO, USO */
#define FZ_GUEST_GSO (1u << 7)         /* GUEST_TSO4/6, ECN, UFO, USO4/6 */

/* cfg.ctl bits */
#define FZ_TX_ENABLED (1u << 0)
#define FZ_RX_ENABLED (1u << 1)
#define FZ_TX_STARTED (1u << 2)
#define FZ_RX_STARTED (1u << 3)
#define FZ_HDR10 (1u << 4)             /* 10-byte vnet header (legacy) */
#define FZ_NO_CALL (1u << 5)           /* no call fds */
#define FZ_REBASE (1u << 6)            /* GET_VRING_BASE / SET_VRING_BASE between rounds */
#define FZ_RESET (1u << 7)             /* reset + reconfigure between rounds */

struct __attribute__((packed)) fuzz_cfg {
    uint8_t features;
    uint8_t ctl;
    uint16_t num[2];                   /* [VR_RX], [VR_TX] */
    uint32_t base[2];
    uint32_t desc[2], avail[2], used[2];  /* guest-physical addresses of the ring parts */
    uint16_t mtu;
    uint8_t rounds;
    uint8_t nframes;                   /* RX frames queued on the TAP stand-in per round (> VR_BURST possible) */
    uint16_t frame_len[4];             /* cycled */
};

static struct vr_mem mem;
static uint8_t *r01, *r2;              /* our views of the regions */
static int r1_fd = -1;                 /* R1's memfd: FZ_TRUNCATE shrinks it */
/* FZ_LOG: the dirty log, 1 bit per 4 KiB from gpa 0, one word (256 KiB) long:
 * R0 and R1 fit, R2 (at 4 GiB) does not, so its marks must be dropped. Guard
 * words around it catch a write past either end. */
static uint64_t log_area[3];
#define LOG_WORDS 1
static struct vr_qp *qp;               /* the one queue pair, across inputs (frontends) */
static int tap_fd = -1, peer_fd = -1;
static int efd[2][3];                  /* kick, call, err per vq */
static bool verbose;                   /* FUZZ_RINGS_VERBOSE=1: counters per input (seed debugging) */

static void die(const char *what)
{
    perror(what);
    abort();
}

static uint8_t *map_region(uint64_t size, int idx, uint64_t gpa, int *keep_fd)
{
    int fd = memfd_create("fuzz-guest", MFD_CLOEXEC);
    void *p;

    if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
        die("memfd");
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    if (keep_fd)
        *keep_fd = fd;
    else
        close(fd);
    mem.regions[idx].gpa = gpa;
    mem.regions[idx].uva = UVA_BASE + gpa;
    mem.regions[idx].size = size;
    mem.regions[idx].hva = (uint64_t)(uintptr_t)p;
    return p;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int sv[2];
    int big = 1 << 21;

    (void)argc;
    (void)argv;
    verbose = getenv("FUZZ_RINGS_VERBOSE") != NULL;
    /* R0 and R1: one mapping each, so that gpa-adjacent bytes are not adjacent here. */
    r01 = map_region(R01_SIZE, 0, R0_GPA, NULL);
    if (map_region(R01_SIZE, 1, R1_GPA, &r1_fd) == NULL)
        abort();
    r2 = map_region(R2_SIZE, 2, R2_GPA, NULL);
    mem.nregions = 3;
    if (vr_mem_validate(&mem) != 0)
        die("vr_mem_validate");
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        die("socketpair");
    tap_fd = sv[0];
    peer_fd = sv[1];
    for (int i = 0; i < 2; i++) {
        setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
        setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    }
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < 3; k++)
            if ((efd[w][k] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
                die("eventfd");
    qp = vr_qp_new(&mem, tap_fd, VR_IO_URING);
    if (!qp)
        die("vr_qp_new");
    if (vr_qp_pause(qp) != 0)           /* parked between inputs, as between frontends */
        abort();
    return 0;
}

/* The frontend shrinks R1 (FZ_TRUNCATE) / the next one brings it back, empty. */
static void shrink_r1(void)
{
    if (ftruncate(r1_fd, 0) < 0)
        die("ftruncate R1");
}

static void restore_r1(void)
{
    if (ftruncate(r1_fd, (off_t)R01_SIZE) < 0)
        die("ftruncate R1 back");
}

static uint8_t *gpa_view(uint64_t gpa)
{
    if (gpa < R01_SIZE)
        return r01 + gpa;
    return (uint8_t *)(uintptr_t)mem.regions[1].hva + (gpa - R1_GPA);
}

/* Copies the image to gpa 0.. across R0 and R1 (two mappings). */
static void load_image(const uint8_t *p, size_t n)
{
    size_t a = n < R01_SIZE ? n : R01_SIZE;

    memcpy(gpa_view(0), p, a);
    if (n > a)
        memcpy(gpa_view(R1_GPA), p + a, n - a);
}

static void clear_memory(void)
{
    memset(gpa_view(0), 0, R01_SIZE);
    memset(gpa_view(R1_GPA), 0, R01_SIZE);
    memset(r2, 0, R2_SIZE);
}

static void drain(int fd)
{
    static uint8_t buf[1 << 17];

    while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0)
        ;
}

static void drain_efds(void)
{
    uint64_t v;

    for (int w = 0; w < 2; w++)
        for (int k = 0; k < 3; k++)
            while (read(efd[w][k], &v, sizeof(v)) == (ssize_t)sizeof(v))
                ;
}

static uint64_t virtio_features(uint8_t f)
{
    uint64_t v = 0;

#define B(n) (1ull << (n))
    if (f & FZ_PACKED)
        v |= B(VR_F_RING_PACKED);
    if (f & FZ_EVENT_IDX)
        v |= B(VR_F_EVENT_IDX);
    if (f & FZ_INDIRECT)
        v |= B(VR_F_INDIRECT_DESC);
    if (f & FZ_MRG)
        v |= B(VR_F_MRG_RXBUF);
    if (f & FZ_V1)
        v |= B(VR_F_VERSION_1);
    if (f & FZ_CSUM)
        v |= B(VR_F_CSUM) | B(VR_F_GUEST_CSUM);
    if (f & FZ_HOST_GSO)
        v |= B(VR_F_HOST_TSO4) | B(VR_F_HOST_TSO6) | B(VR_F_HOST_ECN) | B(VR_F_HOST_UFO) |
             B(VR_F_HOST_USO);
    if (f & FZ_GUEST_GSO)
        v |= B(VR_F_GUEST_TSO4) | B(VR_F_GUEST_TSO6) | B(VR_F_GUEST_ECN) | B(VR_F_GUEST_UFO) |
             B(VR_F_GUEST_USO4) | B(VR_F_GUEST_USO6);
#undef B
    return v;
}

/* The control plane's sequence for one vq (errors are legitimate outcomes). */
static void setup_vq(struct vr_qp *qp, const struct fuzz_cfg *cfg, int w)
{
    const bool no_call = cfg->ctl & FZ_NO_CALL;

    vr_qp_set_num(qp, w, cfg->num[w]);
    vr_qp_set_base(qp, w, cfg->base[w]);
    vr_qp_set_addr(qp, w, UVA_BASE + cfg->desc[w], UVA_BASE + cfg->avail[w], UVA_BASE + cfg->used[w]);
    vr_qp_set_kick(qp, w, efd[w][0]);
    vr_qp_set_call(qp, w, no_call ? -1 : efd[w][1]);
    vr_qp_set_err(qp, w, efd[w][2]);
    vr_qp_set_enabled(qp, w, !!(cfg->ctl & (w == VR_TX ? FZ_TX_ENABLED : FZ_RX_ENABLED)));
    vr_qp_set_started(qp, w, !!(cfg->ctl & (w == VR_TX ? FZ_TX_STARTED : FZ_RX_STARTED)));
}

/*
 * Distance from the avail position to the used position of a parked vq. Every
 * chain popped is pushed or given back before the worker parks, so processing
 * never changes it: 0 for split rings (SET_VRING_BASE sets both), and for packed
 * rings whatever SET_VRING_BASE's two halves said.
 */
static uint32_t used_minus_avail(const struct vr_vq *vq)
{
    if (vq->ops == &vr_split_ops)
        return (uint16_t)(vq->used_idx - vq->last_avail_idx);
    uint32_t lap = 2 * vq->num;
    uint32_t u = vq->used_idx + (vq->used_wrap ? vq->num : 0);
    uint32_t a = vq->last_avail_idx + (vq->avail_wrap ? vq->num : 0);

    return lap ? (u + lap - a) % lap : 0;
}

static uint32_t distance[2];

static void note_parked(struct vr_qp *qp)
{
    for (int w = 0; w < 2; w++)
        distance[w] = used_minus_avail(&qp->vq[w]);
}

static void check_parked(struct vr_qp *qp)
{
    int inflight = vr_qp_inflight(qp);

    if (qp->log_cache_n || log_area[0] || log_area[2]) {
        fprintf(stderr, "dirty log: %u marks not flushed while parked, guards %#lx %#lx\n",
                qp->log_cache_n, log_area[0], log_area[2]);
        abort();
    }
    /* Broken or not (a fault cuts a burst short): nothing popped for a frame or
     * prepared for the TAP may outlive the burst. */
    if (inflight != 0 || qp->stash_count || qp->stash_first || qp->stash_iov_end || qp->stash_bytes ||
        qp->ring.pending) {
        fprintf(stderr, "in flight while parked: %d (stash %u, io_uring %u)\n", inflight, qp->stash_count,
                qp->ring.pending);
        abort();
    }
    for (int w = 0; w < 2; w++) {
        const struct vr_vq *vq = &qp->vq[w];
        uint32_t base;

        if (!vq->mapped)
            continue;
        if (vq->stats.broken == VR_BROKEN_MEMORY)
            continue;                   /* stopped mid-burst: positions are what they were */
        if (used_minus_avail(vq) != distance[w] || vq->used_pending ||
            (vq->ops == &vr_split_ops && vq->published_used_idx != vq->used_idx) ||
            (vq->ops == &vr_packed_ops && (vq->last_avail_idx >= vq->num || vq->used_idx >= vq->num))) {
            fprintf(stderr, "vq %d: used %#x/%d (published %#x, pending %d) avail %#x/%d num %u: "
                    "distance %#x, was %#x\n", w, vq->used_idx, vq->used_wrap, vq->published_used_idx,
                    vq->used_pending, vq->last_avail_idx, vq->avail_wrap, vq->num,
                    used_minus_avail(vq), distance[w]);
            abort();
        }
        if (vr_qp_get_base(qp, w, &base) != 0)
            abort();
    }
}

static void queue_frames(const struct fuzz_cfg *cfg)
{
    static uint8_t frame[65550 + 12];

    for (unsigned i = 0; i < cfg->nframes; i++) {
        uint16_t len = cfg->frame_len[i % 4];

        memset(frame, 0x5a ^ i, len);
        if (len >= 12)
            memset(frame, 0, 12);      /* a plain vnet header */
        if (send(peer_fd, frame, len, MSG_DONTWAIT) < 0 && errno != EAGAIN)
            break;
    }
}

/* Synchronous rounds run on this thread: io_uring requests from here fail
 * (SINGLE_ISSUER) and take the plain fallback, which the worker would then keep
 * for good. Each round restores the mode for the worker phase. */
static void burst_here(struct vr_qp *qp)
{
    int mode = qp->io_mode;

    if (vr_qp_test_burst(qp) < 0)
        abort();
    qp->io_mode = mode;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz_cfg cfg;
    uint32_t hdr;
    unsigned rounds;
    bool truncate, shrunk = false;

    if (size < sizeof(cfg))
        return 0;
    memcpy(&cfg, data, sizeof(cfg));
    data += sizeof(cfg);
    size -= sizeof(cfg);
    if (size > IMAGE_MAX)
        size = IMAGE_MAX;
    clear_memory();
    load_image(data, size);
    drain(tap_fd);
    drain(peer_fd);
    drain_efds();

    /* A new frontend on the queue pair the previous one may have broken. */
    for (int w = 0; w < 2; w++)
        vr_qp_reset_vq(qp, w);
    check_parked(qp);
    hdr = (cfg.ctl & FZ_HDR10) && !(cfg.features & FZ_MRG) ? 10 : 12;
    memset(log_area, 0, sizeof(log_area));
    vr_qp_set_log(qp, (cfg.rounds & FZ_LOG) ? (uint64_t)(uintptr_t)&log_area[1] : 0, LOG_WORDS);
    vr_qp_set_features(qp, virtio_features(cfg.features) |
                       ((cfg.rounds & FZ_LOG) ? 1ull << VR_F_LOG_ALL : 0), hdr);
    vr_qp_set_mtu(qp, 1500);            /* no state from the previous input: */
    vr_qp_set_mtu(qp, cfg.mtu);         /* an invalid MTU leaves the default */
    for (int w = 0; w < 2; w++)
        setup_vq(qp, &cfg, w);
    vr_qp_map(qp);
    note_parked(qp);

    /* With FZ_WORKER 0..3 synchronous rounds come first, else 1..4. */
    rounds = (cfg.rounds & FZ_WORKER) ? (cfg.rounds & 0x1f) % MAX_ROUNDS : 1 + (cfg.rounds & 0x1f) % MAX_ROUNDS;
    truncate = cfg.rounds & FZ_TRUNCATE;
    for (unsigned r = 0; r < rounds; r++) {
        if (truncate && r == 0) {
            shrink_r1();
            shrunk = true;
        }
        queue_frames(&cfg);
        burst_here(qp);
        check_parked(qp);
        drain(peer_fd);
        if (r + 1 < rounds && (cfg.ctl & FZ_REBASE)) {
            /* Stop and restart both rings where they stopped (GET/SET_VRING_BASE). */
            for (int w = 0; w < 2; w++) {
                uint32_t base;

                if (vr_qp_get_base(qp, w, &base) == 0 && vr_qp_set_base(qp, w, base) != 0 &&
                    qp->vq[w].num) {
                    fprintf(stderr, "vq %d: SET_VRING_BASE refused GET_VRING_BASE's %#x\n", w, base);
                    abort();
                }
            }
            vr_qp_map(qp);
            note_parked(qp);
        }
        if (r + 1 < rounds && (cfg.ctl & FZ_RESET)) {
            /* A new frontend on the same queue pair (reconnect). */
            for (int w = 0; w < 2; w++) {
                vr_qp_reset_vq(qp, w);
                setup_vq(qp, &cfg, w);
            }
            vr_qp_map(qp);
            note_parked(qp);
        }
        /* The RX stand-in may have been declared dead (EOF, zero-length read); the
         * worker gives it another chance at every resume, and so do we. */
        qp->tap_dead = false;
    }
    if (cfg.rounds & FZ_WORKER) {
        struct pollfd pfd[4];
        uint64_t one = 1;

        if (truncate && !shrunk) {
            shrink_r1();
            shrunk = true;
        }
        queue_frames(&cfg);
        note_parked(qp);
        if (vr_qp_resume(qp) != 0)
            abort();
        for (int w = 0; w < 2; w++) {
            if (write(efd[w][0], &one, sizeof(one)) < 0)
                die("kick");
            pfd[2 * w] = (struct pollfd){ .fd = efd[w][1], .events = POLLIN };
            pfd[2 * w + 1] = (struct pollfd){ .fd = efd[w][2], .events = POLLIN };
        }
        poll(pfd, 4, WORKER_WAIT_MS);
        if (vr_qp_pause(qp) != 0)
            abort();
        check_parked(qp);
    }
    if (verbose)
        for (int w = 0; w < 2; w++) {
            const struct vr_vq_stats *st = vr_qp_stats(qp, w);

            fprintf(stderr, "%s: packets %lu bytes %lu ring_full %lu tap_busy %lu tap_error %lu "
                    "bad_desc %lu bad_hdr %lu disabled %lu kicks %lu calls %lu suppressed %lu broken %u (%#x)\n",
                    w == VR_TX ? "tx" : "rx", st->packets, st->bytes, st->drop_ring_full,
                    st->drop_tap_busy, st->drop_tap_error, st->drop_bad_desc, st->drop_bad_hdr,
                    st->drop_disabled, st->kicks, st->calls, st->calls_suppressed, st->broken, st->broken_detail);
        }
    check_parked(qp);
    drain(tap_fd);
    if (shrunk)
        restore_r1();
    return 0;
}
