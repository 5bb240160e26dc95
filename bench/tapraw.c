/*
 * tapraw.c — benchmark helper: the raw limit. What a vhost-user-to-TAP backend
 * cannot beat: a loop that owns a TAP and does one syscall per frame on its fd,
 * with no guest, no rings and no frontend. bench/run.py runs it in the
 * benchmark's namespace, pinned to the backend's CPU, against the same host-side
 * traffic as vhostd and DPDK.
 *
 * The TAP is opened like vhostd opens its own (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
 * TUNSETVNETHDRSZ 12, IFF_MULTI_QUEUE and one fd per queue when QUEUES > 1), and
 * each frame crosses as writev/readv of [12-byte virtio_net_hdr_v1, frame] — the
 * syscall vhostd's worker makes per frame. One thread per queue.
 *
 * Modes:
 *   tx    write SIZE-byte UDP frames (frames.h) into the TAP as fast as possible
 *   gso   write 64 KB TCP GSO frames (frames.h, vnet header asks for GSO_TCPV4)
 * Like a backend that reads from a guest's ring, tx and gso cycle through as many
 * distinct buffers as the frontend's ring has (1024 for tx, 256 for gso, matching
 * testpmd's and vufront's queue sizes) in a shared memfd mapping (4 KB pages, like
 * the frontends' guest memory), so the source is not one cache-hot frame.
 *   rx    read frames from the TAP (TUNSETOFFLOAD 0: plain frames)
 *   echo  read a frame, swap its MACs, write it back (the latency reference)
 *
 * Usage: tapraw MODE IFNAME QUEUES SIZE STATSFILE
 * STATSFILE: 64 little-endian u64s updated in place: [0] threads running,
 * [1 + 2q] frames and [2 + 2q] bytes (frame bytes, vnet header excluded) of queue q.
 * Runs until killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "frames.h"

#define MAX_QUEUES 16

enum mode { M_TX, M_GSO, M_RX, M_ECHO };

struct worker {
    int fd, q;
};

static enum mode mode;
static unsigned size;
static volatile uint64_t *stats;

static int open_queue(const char *name, int queues)
{
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC), hdr = BENCH_VNET_HDR_LEN;

    if (fd < 0) {
        perror("tapraw: /dev/net/tun");
        exit(1);
    }
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (queues > 1 ? IFF_MULTI_QUEUE : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0 ||
        ioctl(fd, TUNSETOFFLOAD, 0) < 0) {
        perror("tapraw: TUNSETIFF/TUNSETVNETHDRSZ/TUNSETOFFLOAD");
        exit(1);
    }
    return fd;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    static __thread uint8_t buf[BENCH_GSO_FRAME + 64];
    struct bench_vnet_hdr hdr;
    struct iovec iov[2] = { { &hdr, sizeof(hdr) }, { buf, sizeof(buf) } };
    volatile uint64_t *pk = &stats[1 + 2 * w->q], *by = &stats[2 + 2 * w->q];
    unsigned nbuf = mode == M_GSO ? 256 : 1024, next = 0;
    size_t stride = mode == M_GSO ? (sizeof(hdr) + BENCH_GSO_FRAME + 4095) & ~(size_t)4095 :
                    (sizeof(hdr) + size + 63) & ~(size_t)63;
    uint8_t *pool = NULL;

    memset(&hdr, 0, sizeof(hdr));
    if (mode == M_TX || mode == M_GSO) {
        /* each buffer: [vnet header][frame], like a guest TX buffer, and in the same
         * kind of memory as vufront's and virtio-user's guest memory (shared memfd) */
        int mfd = memfd_create("tapraw", MFD_CLOEXEC);

        if (mfd < 0 || ftruncate(mfd, (off_t)(nbuf * stride)) < 0 ||
            (pool = mmap(NULL, nbuf * stride, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         mfd, 0)) == MAP_FAILED) {
            perror("tapraw: buffers");
            exit(1);
        }
        for (unsigned i = 0; i < nbuf; i++) {
            uint8_t *b = pool + i * stride;

            memset(b, 0, sizeof(hdr));
            if (mode == M_GSO)
                bench_gso_frame((struct bench_vnet_hdr *)b, b + sizeof(hdr), (unsigned)w->q);
            else
                bench_udp_frame(b + sizeof(hdr), size, (unsigned)w->q);
        }
        iov[1].iov_len = mode == M_GSO ? BENCH_GSO_FRAME : size;
    }
    __atomic_add_fetch(&stats[0], 1, __ATOMIC_RELAXED);
    for (;;) {
        long n;

        if (pool) {
            iov[0].iov_base = pool + next * stride;
            iov[1].iov_base = pool + next * stride + sizeof(hdr);
            next = next + 1 == nbuf ? 0 : next + 1;
            n = syscall(SYS_writev, w->fd, iov, 2);
        } else {
            iov[1].iov_len = sizeof(buf);
            n = syscall(SYS_readv, w->fd, iov, 2);
            if (n > (long)sizeof(hdr) && mode == M_ECHO) {
                iov[1].iov_len = (size_t)n - sizeof(hdr);
                bench_swap_macs(buf);
                memset(&hdr, 0, sizeof(hdr));
                if (syscall(SYS_writev, w->fd, iov, 2) < 0)
                    perror("tapraw: echo writev");
            }
        }
        if (n > (long)sizeof(hdr)) {
            *pk += 1;
            *by += (uint64_t)n - sizeof(hdr);
        } else if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EIO) {
            perror("tapraw: writev/readv");
            exit(1);
        } else if (n < 0 && errno == EIO) {
            usleep(1000);               /* TAP not up yet */
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static struct worker workers[MAX_QUEUES];
    pthread_t th;
    int queues, sfd;

    if (argc != 6) {
        fprintf(stderr, "usage: tapraw tx|gso|rx|echo IFNAME QUEUES SIZE STATSFILE\n");
        return 2;
    }
    mode = !strcmp(argv[1], "tx") ? M_TX : !strcmp(argv[1], "gso") ? M_GSO :
           !strcmp(argv[1], "rx") ? M_RX : !strcmp(argv[1], "echo") ? M_ECHO : (enum mode)-1;
    queues = atoi(argv[3]);
    size = (unsigned)atoi(argv[4]);
    if ((int)mode < 0 || queues < 1 || queues > MAX_QUEUES || size < 60 || size > 9018) {
        fprintf(stderr, "tapraw: bad mode, QUEUES (1..%d) or SIZE (60..9018)\n", MAX_QUEUES);
        return 2;
    }
    sfd = open(argv[5], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (sfd < 0 || ftruncate(sfd, 512) < 0) {
        perror("tapraw: stats file");
        return 1;
    }
    stats = mmap(NULL, 512, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (stats == MAP_FAILED) {
        perror("tapraw: mmap");
        return 1;
    }
    for (int q = 0; q < queues; q++) {
        workers[q].fd = open_queue(argv[2], queues);
        workers[q].q = q;
    }
    for (int q = 1; q < queues; q++) {
        if (pthread_create(&th, NULL, run, &workers[q])) {
            fprintf(stderr, "tapraw: pthread_create failed\n");
            return 1;
        }
    }
    run(&workers[0]);
    return 0;
}
