/*
 * vusink.c — benchmark helper: a minimal vhost-user *frontend* that only receives.
 *
 * It plays the guest for the TAP -> guest (RX) benchmark in scripts/bench.py:
 * connects to a backend's vhost-user socket (vhostd or DPDK's net_vhost), offers
 * one queue pair with split rings (VERSION_1 only: no EVENT_IDX, no MRG_RXBUF, no
 * indirect descriptors, so both backends run the same plain path), posts one
 * 2 KB writable buffer per descriptor on the RX ring, and then sleeps in read()
 * on the RX call eventfd. On a wake-up it suppresses interrupts, recycles every
 * used buffer (counts it), kicks only if the backend asked for kicks, re-enables
 * interrupts and re-checks once before sleeping again — the NAPI pattern of a
 * Linux guest driver. It never busy-polls, so it costs both backends the same.
 *
 * The TX ring is set up (DPDK's backend only starts once both rings of the pair
 * are ready) but never used.
 *
 * Usage: vusink SOCKET STATSFILE [QUEUE_SIZE]
 * STATSFILE gets 8 little-endian u64s, updated in place (MAP_SHARED):
 *   [0] ready (1 once the handshake is done), [1] packets, [2] bytes (vnet header
 *   excluded), [3] wake-ups, [4] kicks, [5] bad used entries, [6] spare, [7] spare.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

#define F_PROTOCOL_FEATURES (1ull << 30)
#define F_VERSION_1 (1ull << 32)

#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define HDR_LEN 12                      /* virtio_net_hdr_v1 */
#define BUF_SIZE 2048
#define RING_AREA (64 * 1024)           /* per ring, enough for 1024 entries */

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct used_elem { uint32_t id, len; };

struct ring {
    uint32_t num;
    struct desc *desc;
    volatile uint16_t *avail;           /* flags, idx, ring[num], used_event */
    volatile uint16_t *used;            /* flags, idx, then used_elem[num] */
    int kick, call;
};

struct msg {
    uint32_t req, flags, size;
    union {
        uint64_t u64;
        struct { uint32_t index, num; } state;
        struct { uint32_t index, flags; uint64_t desc, used, avail, log; } addr;
        struct { uint32_t n, pad; uint64_t gpa, size, uva, off; } mem;
    } p;
} __attribute__((packed));

static int sock_fd = -1;

static void die(const char *what)
{
    fprintf(stderr, "vusink: %s: %s\n", what, strerror(errno));
    exit(1);
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

static void setup_ring(struct ring *r, uint8_t *base, uint32_t num)
{
    uintptr_t used_off = (16u * num + 6u + 2u * num + 4095u) & ~4095u;

    r->num = num;
    r->desc = (struct desc *)base;
    r->avail = (volatile uint16_t *)(base + 16u * num);
    r->used = (volatile uint16_t *)(base + used_off);
    r->kick = eventfd(0, EFD_CLOEXEC);
    r->call = eventfd(0, EFD_CLOEXEC);
    if (r->kick < 0 || r->call < 0)
        die("eventfd");
}

static void send_ring(uint32_t index, struct ring *r)
{
    struct { uint32_t index, num; } st = { index, r->num };
    struct { uint32_t index, flags; uint64_t desc, used, avail, log; } ad = {
        index, 0, (uintptr_t)r->desc, (uintptr_t)r->used, (uintptr_t)r->avail, 0 };
    uint64_t idx = index;

    send_msg(VHOST_USER_SET_VRING_NUM, &st, sizeof(st), -1);
    st.num = 0;
    send_msg(VHOST_USER_SET_VRING_BASE, &st, sizeof(st), -1);
    send_msg(VHOST_USER_SET_VRING_ADDR, &ad, sizeof(ad), -1);
    send_msg(VHOST_USER_SET_VRING_CALL, &idx, sizeof(idx), r->call);
    send_msg(VHOST_USER_SET_VRING_KICK, &idx, sizeof(idx), r->kick);
}

int main(int argc, char **argv)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    uint32_t num = argc > 3 ? (uint32_t)atoi(argv[3]) : 1024;
    size_t memsize = 2 * RING_AREA + (size_t)num * BUF_SIZE;
    uint64_t features, *stats;
    uint8_t *mem;
    struct ring rx, tx;
    uint16_t avail_idx, last_used = 0;
    int memfd, sfd;

    if (argc < 3 || num == 0 || num > 1024 || (num & (num - 1))) {
        fprintf(stderr, "usage: vusink SOCKET STATSFILE [QUEUE_SIZE<=1024, power of 2]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    sfd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (sfd < 0 || ftruncate(sfd, 64) < 0)
        die("stats file");
    stats = mmap(NULL, 64, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (stats == MAP_FAILED)
        die("mmap stats");

    memfd = memfd_create("vusink", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)memsize) < 0)
        die("memfd");
    mem = mmap(NULL, memsize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, memfd, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    setup_ring(&rx, mem, num);
    setup_ring(&tx, mem + RING_AREA, num);

    /* Every RX descriptor owns one buffer for good; all are posted up front. */
    for (uint32_t i = 0; i < num; i++) {
        rx.desc[i].addr = (uintptr_t)(mem + 2 * RING_AREA + (size_t)i * BUF_SIZE);
        rx.desc[i].len = BUF_SIZE;
        rx.desc[i].flags = VRING_DESC_F_WRITE;
        rx.desc[i].next = 0;
        rx.avail[2 + i] = (uint16_t)i;
    }
    avail_idx = (uint16_t)num;
    __atomic_store_n(&rx.avail[1], avail_idx, __ATOMIC_RELEASE);

    sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[1]);
    for (int tries = 0; connect(sock_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0; tries++) {
        if (tries > 200)
            die("connect");
        usleep(50000);
    }

    send_msg(VHOST_USER_SET_OWNER, NULL, 0, -1);
    features = get_u64(VHOST_USER_GET_FEATURES);
    if (!(features & F_VERSION_1)) {
        errno = ENOTSUP;
        die("backend lacks VERSION_1");
    }
    if (features & F_PROTOCOL_FEATURES) {
        uint64_t none = 0;

        (void)get_u64(VHOST_USER_GET_PROTOCOL_FEATURES);
        send_msg(VHOST_USER_SET_PROTOCOL_FEATURES, &none, 8, -1);
    }
    features &= F_VERSION_1 | F_PROTOCOL_FEATURES;
    send_msg(VHOST_USER_SET_FEATURES, &features, 8, -1);
    {
        struct { uint32_t n, pad; uint64_t gpa, size, uva, off; } mt = {
            1, 0, (uintptr_t)mem, memsize, (uintptr_t)mem, 0 };

        send_msg(VHOST_USER_SET_MEM_TABLE, &mt, sizeof(mt), memfd);
    }
    send_ring(0, &rx);
    send_ring(1, &tx);
    if (features & F_PROTOCOL_FEATURES) {
        for (uint32_t i = 0; i < 2; i++) {
            struct { uint32_t index, num; } st = { i, 1 };

            send_msg(VHOST_USER_SET_VRING_ENABLE, &st, sizeof(st), -1);
        }
    }
    { uint64_t one = 1; if (write(rx.kick, &one, 8) < 0) die("kick"); }
    stats[0] = 1;
    fprintf(stderr, "vusink: ready (features 0x%llx, queue size %u)\n",
            (unsigned long long)features, num);

    volatile struct used_elem *ue = (volatile struct used_elem *)(rx.used + 2);
    for (;;) {
        uint64_t v;

        if (read(rx.call, &v, 8) != 8) {
            if (errno == EINTR)
                continue;
            die("read call eventfd");
        }
        stats[3]++;
        rx.avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
        for (;;) {
            uint16_t uidx = __atomic_load_n(&rx.used[1], __ATOMIC_ACQUIRE);
            uint64_t pk = 0, by = 0;

            while (last_used != uidx) {
                uint32_t id = ue[last_used & (num - 1)].id;
                uint32_t len = ue[last_used & (num - 1)].len;

                last_used++;
                if (id >= num) {
                    stats[5]++;
                    continue;
                }
                pk++;
                by += len > HDR_LEN ? len - HDR_LEN : 0;
                rx.avail[2 + (avail_idx & (num - 1))] = (uint16_t)id;
                avail_idx++;
            }
            if (pk) {
                __atomic_store_n(&rx.avail[1], avail_idx, __ATOMIC_RELEASE);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (!(rx.used[0] & VRING_USED_F_NO_NOTIFY)) {
                    uint64_t one = 1;

                    if (write(rx.kick, &one, 8) == 8)
                        stats[4]++;
                }
                stats[1] += pk;
                stats[2] += by;
                continue;
            }
            rx.avail[0] = 0;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&rx.used[1], __ATOMIC_ACQUIRE) == last_used)
                break;
            rx.avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
        }
    }
}
