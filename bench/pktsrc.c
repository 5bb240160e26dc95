/*
 * pktsrc.c — benchmark helper: floods one interface (the backend's TAP, inside the
 * benchmark's network namespace) with fixed-size UDP/IPv4 Ethernet frames.
 *
 * AF_PACKET raw socket bound to the interface, PACKET_QDISC_BYPASS (frames go
 * straight to the TAP's xmit, i.e. into the queue the backend reads) and
 * sendmmsg() in batches of 64. The send buffer is forced large so the sender never
 * sleeps on socket memory: when the backend falls behind, the TAP's own queue
 * (txqueuelen frames) overflows and the TAP counts tx_dropped. The frames are
 * frames.h's UDP frames, 198.18.0.1 -> 198.18.0.2 (benchmarking range, RFC 2544),
 * which never leave the namespace; each batch carries BATCH flows (UDP source
 * ports) so that a multi-queue TAP spreads them over all its queues.
 *
 * Usage: pktsrc IFNAME FRAME_SIZE STATSFILE [drain]
 * STATSFILE gets 4 u64s updated in place: [0] frames sent, [1] send errors.
 *
 * With "drain" it is the host-side consumer instead (bench/run.py --tx-drain):
 * an AF_PACKET socket on the interface takes every incoming frame with recvmmsg()
 * in batches of 64 (MSG_TRUNC: only the first 128 bytes are copied, the length is
 * the frame's) and counts it: [0] frames, [1] errors, [2] bytes. FRAME_SIZE is
 * ignored then.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "frames.h"

#define BATCH 64

static int drain(int ifindex, volatile uint64_t *stats)
{
    static uint8_t bufs[BATCH][128];
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                               .sll_ifindex = ifindex };
    struct sockaddr_ll from[BATCH];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL)), rcvbuf = 64 << 20;

    if (fd < 0 || bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("pktsrc: drain socket");
        return 1;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
        perror("pktsrc: SO_RCVBUFFORCE (continuing)");
    for (;;) {
        int n;

        memset(msgs, 0, sizeof(msgs));
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof(bufs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(from[i]);
        }
        n = recvmmsg(fd, msgs, BATCH, MSG_TRUNC | MSG_WAITFORONE, NULL);
        if (n < 0) {
            stats[1]++;
            if (errno != EINTR && errno != ENOBUFS) {
                perror("pktsrc: recvmmsg");
                return 1;
            }
            continue;
        }
        for (int i = 0; i < n; i++) {
            if (from[i].sll_pkttype == PACKET_OUTGOING)
                continue;
            stats[0]++;
            stats[2] += msgs[i].msg_len;
        }
    }
}

int main(int argc, char **argv)
{
    static uint8_t frames[BATCH][9018];
    struct sockaddr_ll sll = { .sll_family = AF_PACKET };
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    uint64_t *stats;
    int fd, sfd, one = 1, sndbuf = 64 << 20;
    unsigned size;

    if (argc != 4 && !(argc == 5 && !strcmp(argv[4], "drain"))) {
        fprintf(stderr, "usage: pktsrc IFNAME FRAME_SIZE STATSFILE [drain]\n");
        return 2;
    }
    size = (unsigned)atoi(argv[2]);
    if (size < 60 || size > sizeof(frames[0])) {
        fprintf(stderr, "pktsrc: frame size must be 60..%zu\n", sizeof(frames[0]));
        return 2;
    }
    sfd = open(argv[3], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (sfd < 0 || ftruncate(sfd, 32) < 0) {
        perror("pktsrc: stats file");
        return 1;
    }
    stats = mmap(NULL, 32, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (stats == MAP_FAILED) {
        perror("pktsrc: mmap");
        return 1;
    }

    sll.sll_ifindex = (int)if_nametoindex(argv[1]);
    if (!sll.sll_ifindex) {
        fprintf(stderr, "pktsrc: no interface %s\n", argv[1]);
        return 1;
    }
    if (argc == 5)
        return drain(sll.sll_ifindex, stats);
    fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);     /* protocol 0: send only */
    if (fd < 0) {
        perror("pktsrc: socket");
        return 1;
    }
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("pktsrc: bind");
        return 1;
    }
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
        perror("pktsrc: PACKET_QDISC_BYPASS (continuing)");
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
        perror("pktsrc: SO_SNDBUFFORCE (continuing)");

    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        bench_udp_frame(frames[i], size, (unsigned)i);
        iov[i].iov_base = frames[i];
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (;;) {
        int n = sendmmsg(fd, msgs, BATCH, 0);

        if (n > 0) {
            stats[0] += (uint64_t)n;
        } else {
            stats[1]++;
            if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) {
                perror("pktsrc: sendmmsg");
                return 1;
            }
            sched_yield();
        }
    }
}
