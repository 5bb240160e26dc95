/*
 * vufront.c — benchmark helper: a minimal vhost-user *frontend* (the guest side)
 * for what DPDK's virtio-user cannot do or would do by busy-polling:
 *
 *   gso   transmit 64 KB TCP GSO frames (frames.h: virtio_net_hdr_v1 with
 *         NEEDS_CSUM + GSO_TCPV4, gso_size 1448) on every TX queue, one thread per
 *         queue pair, negotiating CSUM + HOST_TSO4 — the guest -> TAP GSO point;
 *   echo  receive frames on RX queue 0 and send each back on TX queue 0 with its
 *         MAC addresses swapped — the guest half of the latency measurement;
 *   rx    receive and count only (the former vusink; an alternative RX sink that
 *         sleeps instead of polling: `bench/run.py --rx-sink vufront`);
 *   tx    transmit small UDP frames (--size, default 64 B) on every TX queue, the
 *         way gso does: the guest -> TAP point with a generator whose memory
 *         layout we choose (--regions).
 *
 * Options (before MODE):
 *   --regions N  describe guest memory as N regions (slices of the one memfd),
 *                added one by one with ADD_MEM_REG (protocol feature
 *                CONFIGURE_MEM_SLOTS): the backend translates through N regions;
 *   --log        live-migration dirty logging on, as QEMU turns it on: SET_LOG_BASE
 *                (a memfd log, protocol feature LOG_SHMFD), SET_FEATURES | LOG_ALL,
 *                SET_VRING_ADDR with VHOST_VRING_F_LOG; a thread harvests the log
 *                every 10 ms with atomic exchanges, as QEMU does;
 *   --size N     tx mode frame size (60..1514).
 *
 * It connects to a backend's vhost-user socket (vhostd or DPDK's net_vhost),
 * offers QUEUES queue pairs (MQ when > 1) with split rings of QUEUE_SIZE, features
 * VERSION_1 (+ CSUM/HOST_TSO4 for gso) and nothing else: no EVENT_IDX, no
 * MRG_RXBUF, no indirect descriptors — every backend runs its plain path. Guest
 * memory is one memfd region holding the rings and all buffers; each descriptor
 * owns one buffer for good.
 *
 * It never busy-polls: it sleeps in read() on a call eventfd and, on a wake-up,
 * suppresses interrupts, handles every used entry, kicks only if the backend asked
 * for kicks, re-enables interrupts and re-checks once before sleeping again (the
 * NAPI pattern of a Linux guest driver; virtio 1.2 §2.7.7/§2.7.10 without
 * EVENT_IDX). Ring publication: entries, then a release store of avail->idx;
 * used->idx is read with acquire before its entries.
 *
 * Guest-physical addresses are offsets into that memfd (gpa 0 = its first byte),
 * as small as a guest's, so that a dirty log for them is small too.
 *
 * Usage: vufront [--regions N] [--log] [--size N] MODE SOCKET STATSFILE [QUEUES [QUEUE_SIZE]]
 * STATSFILE: 8 little-endian u64s updated in place (MAP_SHARED): [0] ready (1 once
 * the handshake is done), [1] frames, [2] bytes (vnet header excluded), [3]
 * wake-ups, [4] kicks, [5] bad used entries, [6] frames dropped (echo: no free TX
 * buffer), [7] dirty pages harvested from the log (--log). Frames = received (rx,
 * echo) or completed by the backend (gso, tx).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "frames.h"

#define VHOST_USER_GET_FEATURES 1
#define VHOST_USER_SET_FEATURES 2
#define VHOST_USER_SET_OWNER 3
#define VHOST_USER_SET_MEM_TABLE 5
#define VHOST_USER_SET_VRING_NUM 8
#define VHOST_USER_SET_VRING_ADDR 9
#define VHOST_USER_SET_VRING_BASE 10
#define VHOST_USER_SET_VRING_KICK 12
#define VHOST_USER_SET_VRING_CALL 13
#define VHOST_USER_GET_PROTOCOL_FEATURES 15
#define VHOST_USER_SET_PROTOCOL_FEATURES 16
#define VHOST_USER_SET_VRING_ENABLE 18
#define VHOST_USER_SET_LOG_BASE 6
#define VHOST_USER_GET_MAX_MEM_SLOTS 36
#define VHOST_USER_ADD_MEM_REG 37

#define F_CSUM (1ull << 0)
#define F_HOST_TSO4 (1ull << 11)
#define F_MQ (1ull << 22)
#define F_PROTOCOL_FEATURES (1ull << 30)
#define F_VERSION_1 (1ull << 32)
#define F_LOG_ALL (1ull << 26)
#define PF_MQ (1ull << 0)
#define PF_LOG_SHMFD (1ull << 1)
#define PF_CONFIGURE_MEM_SLOTS (1ull << 15)
#define VHOST_VRING_F_LOG 1

#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define SMALL_BUF 2048
#define GSO_BUF ((BENCH_VNET_HDR_LEN + BENCH_GSO_FRAME + 4095) & ~4095)
#define RING_AREA (64 * 1024)           /* per ring, enough for 1024 entries */
#define MAX_QUEUES 8

enum mode { M_RX, M_GSO, M_ECHO, M_TX };

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct used_elem { uint32_t id, len; };

struct ring {
    uint32_t num;
    struct desc *desc;
    volatile uint16_t *avail;           /* flags, idx, ring[num], used_event */
    volatile uint16_t *used;            /* flags, idx, then used_elem[num] */
    uint8_t *bufs;                      /* num buffers of bufsize */
    size_t bufsize;
    uint16_t avail_idx, last_used;
    uint16_t *free_ids;                 /* TX: ids not in the ring */
    uint32_t nfree;
    int kick, call;
};

struct pair { struct ring rx, tx; };

struct msg {
    uint32_t req, flags, size;
    union {
        uint64_t u64;
        struct { uint32_t index, num; } state;
        struct { uint32_t index, flags; uint64_t desc, used, avail, log; } addr;
        struct { uint32_t n, pad; uint64_t gpa, size, uva, off; } mem;
        struct { uint64_t pad, gpa, size, uva, off; } reg;
        struct { uint64_t size, off; } log;
    } p;
} __attribute__((packed));

static int sock_fd = -1;
static volatile uint64_t *stats;
static struct pair pairs[MAX_QUEUES];
static uint8_t *mem_base;               /* guest memory; gpa = offset from here */
static unsigned tx_size = 64;           /* tx mode frame size */

static uint64_t gpa_of(const void *p)
{
    return (uint64_t)((const uint8_t *)p - mem_base);
}

static void die(const char *what)
{
    fprintf(stderr, "vufront: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void add(int i, uint64_t v)
{
    if (v)
        __atomic_add_fetch(&stats[i], v, __ATOMIC_RELAXED);
}

static void send_msg(uint32_t req, const void *payload, uint32_t size, int fd)
{
    struct msg m = { .req = req, .flags = 1, .size = size };
    struct iovec iov = { .iov_base = &m, .iov_len = 12 + size };
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

    if (size)
        memcpy(&m.p, payload, size);
    if (fd >= 0) {
        struct cmsghdr *c;

        memset(cbuf, 0, sizeof(cbuf));
        mh.msg_control = cbuf;
        mh.msg_controllen = sizeof(cbuf);
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    if (sendmsg(sock_fd, &mh, MSG_NOSIGNAL) != (ssize_t)(12 + size))
        die("sendmsg");
}

static uint64_t get_u64(uint32_t req)
{
    struct msg m;
    ssize_t n;

    send_msg(req, NULL, 0, -1);
    n = recv(sock_fd, &m, 12 + 8, MSG_WAITALL);
    if (n != 20 || m.req != req || m.size != 8) {
        errno = EPROTO;
        die("reply");
    }
    return m.p.u64;
}

static void setup_ring(struct ring *r, uint8_t *area, uint8_t *bufs, size_t bufsize, uint32_t num)
{
    uintptr_t used_off = (16u * num + 6u + 2u * num + 4095u) & ~4095u;

    r->num = num;
    r->desc = (struct desc *)area;
    r->avail = (volatile uint16_t *)(area + 16u * num);
    r->used = (volatile uint16_t *)(area + used_off);
    r->bufs = bufs;
    r->bufsize = bufsize;
    r->free_ids = calloc(num, sizeof(uint16_t));
    r->kick = eventfd(0, EFD_CLOEXEC);
    r->call = eventfd(0, EFD_CLOEXEC);
    if (r->kick < 0 || r->call < 0 || !r->free_ids)
        die("eventfd/calloc");
    for (uint32_t i = 0; i < num; i++) {
        r->desc[i].addr = gpa_of(bufs + i * bufsize);
        r->desc[i].len = (uint32_t)bufsize;
        r->desc[i].flags = 0;
        r->desc[i].next = 0;
        r->free_ids[r->nfree++] = (uint16_t)(num - 1 - i);
    }
}

/* A reply to a request that always gets one (SET_LOG_BASE): header and payload. */
static void read_reply(uint32_t req)
{
    struct msg m;

    if (recv(sock_fd, &m, 12, MSG_WAITALL) != 12 || m.req != req || m.flags != 5 || m.size > sizeof(m.p) ||
        (m.size && recv(sock_fd, &m.p, m.size, MSG_WAITALL) != (ssize_t)m.size)) {
        errno = EPROTO;
        die("reply");
    }
}

static void send_addr(uint32_t index, struct ring *r, uint32_t flags)
{
    struct { uint32_t index, flags; uint64_t desc, used, avail, log; } ad = {
        index, flags, (uintptr_t)r->desc, (uintptr_t)r->used, (uintptr_t)r->avail, gpa_of((void *)r->used) };

    send_msg(VHOST_USER_SET_VRING_ADDR, &ad, sizeof(ad), -1);
}

/* --log: QEMU's harvest (vhost_dev_sync_region): exchange each word with 0. */
static volatile uint64_t *dirty_log;
static size_t dirty_words;

static void *log_harvester(void *arg)
{
    (void)arg;
    for (;;) {
        uint64_t pages = 0;

        usleep(10000);
        for (size_t i = 0; i < dirty_words; i++)
            if (dirty_log[i])
                pages += (uint64_t)__builtin_popcountll(__atomic_exchange_n(&dirty_log[i], 0, __ATOMIC_ACQ_REL));
        add(7, pages);
    }
    return NULL;
}

static void send_ring(uint32_t index, struct ring *r)
{
    struct { uint32_t index, num; } st = { index, r->num };
    uint64_t idx = index;

    send_msg(VHOST_USER_SET_VRING_NUM, &st, sizeof(st), -1);
    st.num = 0;
    send_msg(VHOST_USER_SET_VRING_BASE, &st, sizeof(st), -1);
    send_addr(index, r, 0);
    send_msg(VHOST_USER_SET_VRING_CALL, &idx, sizeof(idx), r->call);
    send_msg(VHOST_USER_SET_VRING_KICK, &idx, sizeof(idx), r->kick);
}

/* Put every free id into the avail ring (entries first, then the index). */
static uint32_t post_free(struct ring *r)
{
    uint32_t n = r->nfree;

    while (r->nfree) {
        r->avail[2 + (r->avail_idx & (r->num - 1))] = r->free_ids[--r->nfree];
        r->avail_idx++;
    }
    if (n)
        __atomic_store_n(&r->avail[1], r->avail_idx, __ATOMIC_RELEASE);
    return n;
}

/* After publishing: kick unless the device said it does not need one. */
static void maybe_kick(struct ring *r)
{
    uint64_t one = 1;

    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!(r->used[0] & VRING_USED_F_NO_NOTIFY) && write(r->kick, &one, 8) == 8)
        add(4, 1);
}

/* Sleep until the device signals `r`: interrupts on, re-check, read, interrupts off. */
static void wait_call(struct ring *r)
{
    uint64_t v;

    r->avail[0] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&r->used[1], __ATOMIC_ACQUIRE) == r->last_used) {
        while (read(r->call, &v, 8) != 8)
            if (errno != EINTR)
                die("read call eventfd");
        add(3, 1);
    }
    r->avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
}

/* Take the next used entry of `r`; returns 0 when there is none. */
static int next_used(struct ring *r, uint16_t uidx, uint32_t *id, uint32_t *len)
{
    volatile struct used_elem *ue = (volatile struct used_elem *)(r->used + 2);

    while (r->last_used != uidx) {
        *id = ue[r->last_used & (r->num - 1)].id;
        *len = ue[r->last_used & (r->num - 1)].len;
        r->last_used++;
        if (*id < r->num)
            return 1;
        add(5, 1);
    }
    return 0;
}

static enum mode run_mode;

/* gso and tx: every TX buffer holds one ready frame; the loop recycles them. */
static void *gso_loop(void *arg)
{
    struct ring *r = &((struct pair *)arg)->tx;
    unsigned flow = (unsigned)((struct pair *)arg - pairs);
    uint64_t frame_bytes = run_mode == M_TX ? tx_size : BENCH_GSO_FRAME;

    for (uint32_t i = 0; i < r->num; i++) {
        uint8_t *b = r->bufs + i * r->bufsize;

        if (run_mode == M_TX) {
            memset(b, 0, BENCH_VNET_HDR_LEN);
            bench_udp_frame(b + BENCH_VNET_HDR_LEN, tx_size, flow);
        } else {
            bench_gso_frame((struct bench_vnet_hdr *)b, b + BENCH_VNET_HDR_LEN, flow);
        }
        r->desc[i].len = (uint32_t)(BENCH_VNET_HDR_LEN + frame_bytes);
    }
    r->avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
    for (;;) {
        uint16_t uidx = __atomic_load_n(&r->used[1], __ATOMIC_ACQUIRE);
        uint32_t id, len, done = 0;

        while (next_used(r, uidx, &id, &len)) {
            r->free_ids[r->nfree++] = (uint16_t)id;
            done++;
        }
        add(1, done);
        add(2, done * frame_bytes);
        if (post_free(r))
            maybe_kick(r);
        if (!done)
            wait_call(r);
    }
    return NULL;
}

static void *rx_loop(void *arg)
{
    struct ring *r = &((struct pair *)arg)->rx;

    for (;;) {
        uint16_t uidx;
        uint32_t id, len;
        uint64_t pk = 0, by = 0;

        wait_call(r);
        while ((uidx = __atomic_load_n(&r->used[1], __ATOMIC_ACQUIRE)) != r->last_used) {
            while (next_used(r, uidx, &id, &len)) {
                pk++;
                by += len > BENCH_VNET_HDR_LEN ? len - BENCH_VNET_HDR_LEN : 0;
                r->free_ids[r->nfree++] = (uint16_t)id;
            }
            post_free(r);
            maybe_kick(r);
        }
        add(1, pk);
        add(2, by);
    }
    return NULL;
}

static void echo_loop(struct pair *p)
{
    struct ring *rx = &p->rx, *tx = &p->tx;

    tx->avail[0] = VRING_AVAIL_F_NO_INTERRUPT;      /* TX completions are reaped lazily */
    for (;;) {
        uint16_t uidx;
        uint32_t id, len, tid, tlen;

        wait_call(rx);
        while ((uidx = __atomic_load_n(&rx->used[1], __ATOMIC_ACQUIRE)) != rx->last_used) {
            uint16_t tuidx = __atomic_load_n(&tx->used[1], __ATOMIC_ACQUIRE);
            uint32_t sent = 0;

            while (next_used(tx, tuidx, &tid, &tlen))
                tx->free_ids[tx->nfree++] = (uint16_t)tid;
            while (next_used(rx, uidx, &id, &len)) {
                uint8_t *src = rx->bufs + id * rx->bufsize;

                rx->free_ids[rx->nfree++] = (uint16_t)id;
                if (len <= BENCH_VNET_HDR_LEN + 14 || len > rx->bufsize || !tx->nfree) {
                    add(6, 1);
                    continue;
                }
                tid = tx->free_ids[--tx->nfree];
                {
                    uint8_t *dst = tx->bufs + tid * tx->bufsize;

                    memset(dst, 0, BENCH_VNET_HDR_LEN);
                    memcpy(dst + BENCH_VNET_HDR_LEN, src + BENCH_VNET_HDR_LEN, len - BENCH_VNET_HDR_LEN);
                    bench_swap_macs(dst + BENCH_VNET_HDR_LEN);
                    tx->desc[tid].len = len;
                }
                tx->avail[2 + (tx->avail_idx & (tx->num - 1))] = (uint16_t)tid;
                tx->avail_idx++;
                sent++;
                add(1, 1);
                add(2, len - BENCH_VNET_HDR_LEN);
            }
            if (sent) {
                __atomic_store_n(&tx->avail[1], tx->avail_idx, __ATOMIC_RELEASE);
                maybe_kick(tx);
            }
            post_free(rx);
            maybe_kick(rx);
        }
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "regions", required_argument, NULL, 'r' },
        { "log", no_argument, NULL, 'l' },
        { "size", required_argument, NULL, 's' },
        { NULL, 0, NULL, 0 },
    };
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    enum mode mode;
    uint32_t queues, num, nregions = 0;
    size_t rxbuf, txbuf, memsize, off;
    uint64_t features, want, pf = 0;
    uint8_t *mem;
    int memfd, sfd, opt, use_log = 0;

    while ((opt = getopt_long(argc, argv, "+", opts, NULL)) != -1) {
        if (opt == 'r')
            nregions = (uint32_t)atoi(optarg);
        else if (opt == 'l')
            use_log = 1;
        else if (opt == 's')
            tx_size = (unsigned)atoi(optarg);
        else
            return 2;
    }
    argc -= optind - 1;
    argv += optind - 1;
    queues = argc > 4 ? (uint32_t)atoi(argv[4]) : 1;
    num = argc > 5 ? (uint32_t)atoi(argv[5]) : 1024;
    if (argc < 4 || !strcmp(argv[1], "-h")) {
        fprintf(stderr, "usage: vufront [--regions N] [--log] [--size N] rx|gso|echo|tx SOCKET STATSFILE "
                "[QUEUES [QUEUE_SIZE]]\n");
        return 2;
    }
    mode = !strcmp(argv[1], "rx") ? M_RX : !strcmp(argv[1], "gso") ? M_GSO :
           !strcmp(argv[1], "echo") ? M_ECHO : !strcmp(argv[1], "tx") ? M_TX : (enum mode)-1;
    if ((int)mode < 0 || queues < 1 || queues > MAX_QUEUES || (mode == M_ECHO && queues != 1) ||
        num == 0 || num > 1024 || (num & (num - 1)) || nregions > 4096 || tx_size < 60 || tx_size > 1514) {
        fprintf(stderr, "vufront: bad mode, QUEUES (1..%d; echo: 1), QUEUE_SIZE (power of 2 <= 1024), "
                "--regions (<= 4096) or --size (60..1514)\n", MAX_QUEUES);
        return 2;
    }
    run_mode = mode;
    signal(SIGPIPE, SIG_IGN);

    sfd = open(argv[3], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (sfd < 0 || ftruncate(sfd, 64) < 0)
        die("stats file");
    stats = mmap(NULL, 64, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (stats == MAP_FAILED)
        die("mmap stats");

    rxbuf = mode == M_GSO || mode == M_TX ? 64 : SMALL_BUF;  /* gso, tx: RX ring posted with tiny buffers */
    txbuf = mode == M_GSO ? GSO_BUF : SMALL_BUF;
    memsize = queues * (2 * RING_AREA + num * (rxbuf + txbuf));
    memfd = memfd_create("vufront", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)memsize) < 0)
        die("memfd");
    mem = mmap(NULL, memsize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, memfd, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    mem_base = mem;
    off = 0;
    for (uint32_t q = 0; q < queues; q++) {
        struct pair *p = &pairs[q];
        /* With --regions every ring area comes first (region 0: a ring must lie
         * inside one region) and the buffers after, sliced into the other regions. */
        uint8_t *rings = nregions ? mem + q * 2 * RING_AREA : mem + off;
        uint8_t *bufs = nregions ? mem + queues * 2 * RING_AREA + q * num * (rxbuf + txbuf)
                                 : mem + off + 2 * RING_AREA;

        setup_ring(&p->rx, rings, bufs, rxbuf, num);
        setup_ring(&p->tx, rings + RING_AREA, bufs + num * rxbuf, txbuf, num);
        off += 2 * RING_AREA + num * (rxbuf + txbuf);
        for (uint32_t i = 0; i < num; i++)
            p->rx.desc[i].flags = VRING_DESC_F_WRITE;
        post_free(&p->rx);               /* every RX buffer is posted up front */
        p->rx.avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
    }

    sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[2]);
    for (int tries = 0; connect(sock_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0; tries++) {
        if (tries > 200)
            die("connect");
        usleep(50000);
    }

    send_msg(VHOST_USER_SET_OWNER, NULL, 0, -1);
    features = get_u64(VHOST_USER_GET_FEATURES);
    want = F_VERSION_1 | F_PROTOCOL_FEATURES | (queues > 1 ? F_MQ : 0) |
           (mode == M_GSO ? F_CSUM | F_HOST_TSO4 : 0) | (use_log ? F_LOG_ALL : 0);
    if ((features & want & ~F_PROTOCOL_FEATURES) != (want & ~F_PROTOCOL_FEATURES)) {
        fprintf(stderr, "vufront: backend features 0x%llx lack some of 0x%llx\n",
                (unsigned long long)features, (unsigned long long)want);
        return 1;
    }
    if (features & F_PROTOCOL_FEATURES) {
        uint64_t wpf = (queues > 1 ? PF_MQ : 0) | (nregions ? PF_CONFIGURE_MEM_SLOTS : 0) |
                       (use_log ? PF_LOG_SHMFD : 0);

        pf = get_u64(VHOST_USER_GET_PROTOCOL_FEATURES) & wpf;
        if (pf != wpf) {
            fprintf(stderr, "vufront: backend protocol features lack some of 0x%llx\n",
                    (unsigned long long)wpf);
            return 1;
        }
        send_msg(VHOST_USER_SET_PROTOCOL_FEATURES, &pf, 8, -1);
    } else if (nregions || use_log) {
        fprintf(stderr, "vufront: --regions and --log need protocol features\n");
        return 1;
    }
    features &= want & ~F_LOG_ALL;     /* LOG_ALL once the log is there, as QEMU does */
    send_msg(VHOST_USER_SET_FEATURES, &features, 8, -1);
    if (!nregions) {
        struct { uint32_t n, pad; uint64_t gpa, size, uva, off; } mt = {
            1, 0, 0, memsize, (uintptr_t)mem, 0 };

        send_msg(VHOST_USER_SET_MEM_TABLE, &mt, sizeof(mt), memfd);
    } else {
        /* Region 0: the ring areas; then N-1 page-aligned slices of the buffers,
         * the last one taking the rest (N = 1: one region for everything). */
        size_t head = nregions > 1 ? queues * 2 * RING_AREA : memsize;
        size_t slice = nregions > 1 ? ((memsize - head) / (nregions - 1)) & ~(size_t)4095 : 0;

        if ((nregions > 1 && !slice) || get_u64(VHOST_USER_GET_MAX_MEM_SLOTS) < nregions) {
            fprintf(stderr, "vufront: %u regions: memory too small or beyond the backend's slots\n", nregions);
            return 1;
        }
        for (uint32_t i = 0; i < nregions; i++) {
            size_t start = i ? head + (i - 1) * slice : 0;
            size_t len = i + 1 == nregions ? memsize - start : i ? slice : head;
            struct { uint64_t pad, gpa, size, uva, off; } reg = { 0, start, len, (uintptr_t)mem + start, start };

            send_msg(VHOST_USER_ADD_MEM_REG, &reg, sizeof(reg), memfd);
        }
    }
    for (uint32_t q = 0; q < queues; q++) {
        send_ring(2 * q, &pairs[q].rx);
        send_ring(2 * q + 1, &pairs[q].tx);
    }
    if (features & F_PROTOCOL_FEATURES) {
        for (uint32_t i = 0; i < 2 * queues; i++) {
            struct { uint32_t index, num; } st = { i, 1 };

            send_msg(VHOST_USER_SET_VRING_ENABLE, &st, sizeof(st), -1);
        }
    }
    if (use_log) {
        /* QEMU's order when migration starts: SET_LOG_BASE (it waits for the reply),
         * SET_FEATURES | LOG_ALL, then every ring's address with the log flag. */
        int lfd = memfd_create("vufront-log", MFD_CLOEXEC);
        struct { uint64_t size, off; } lb;
        pthread_t th;

        dirty_words = (memsize + 4096 * 64 - 1) / (4096 * 64);
        lb.size = dirty_words * 8;
        lb.off = 0;
        if (lfd < 0 || ftruncate(lfd, (off_t)lb.size) < 0)
            die("log memfd");
        dirty_log = mmap(NULL, lb.size, PROT_READ | PROT_WRITE, MAP_SHARED, lfd, 0);
        if (dirty_log == MAP_FAILED)
            die("mmap log");
        send_msg(VHOST_USER_SET_LOG_BASE, &lb, sizeof(lb), lfd);
        read_reply(VHOST_USER_SET_LOG_BASE);
        features |= F_LOG_ALL;
        send_msg(VHOST_USER_SET_FEATURES, &features, 8, -1);
        for (uint32_t q = 0; q < queues; q++) {
            send_addr(2 * q, &pairs[q].rx, VHOST_VRING_F_LOG);
            send_addr(2 * q + 1, &pairs[q].tx, VHOST_VRING_F_LOG);
        }
        if (pthread_create(&th, NULL, log_harvester, NULL))
            die("pthread_create");
    }
    for (uint32_t q = 0; q < queues; q++)
        maybe_kick(&pairs[q].rx);
    fprintf(stderr, "vufront: %s ready (features 0x%llx, %u queue pair(s) of %u, %u region(s)%s)\n",
            argv[1], (unsigned long long)features, queues, num, nregions ? nregions : 1,
            use_log ? ", dirty log on" : "");
    stats[0] = 1;

    if (mode == M_ECHO)
        echo_loop(&pairs[0]);
    for (uint32_t q = 1; q < queues; q++) {
        pthread_t th;

        if (pthread_create(&th, NULL, mode == M_GSO || mode == M_TX ? gso_loop : rx_loop, &pairs[q])) {
            fprintf(stderr, "vufront: pthread_create failed\n");
            return 1;
        }
    }
    (mode == M_GSO || mode == M_TX ? gso_loop : rx_loop)(&pairs[0]);
    return 0;
}
