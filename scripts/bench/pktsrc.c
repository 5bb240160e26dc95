/*
 * pktsrc.c — benchmark helper: floods one interface (the backend's TAP, inside the
 * benchmark's network namespace) with fixed-size UDP/IPv4 Ethernet frames.
 *
 * AF_PACKET raw socket bound to the interface, PACKET_QDISC_BYPASS (frames go
 * straight to the TAP's xmit, i.e. into the queue the backend reads) and
 * sendmmsg() in batches of 64. The send buffer is forced large so the sender never
 * sleeps on socket memory: when the backend falls behind, the TAP's own queue
 * (txqueuelen frames) overflows and the TAP counts tx_dropped. Addresses are
 * 198.18.0.1 -> 198.18.0.2 (benchmarking range, RFC 2544) and never leave the
 * namespace.
 *
 * Usage: pktsrc IFNAME FRAME_SIZE STATSFILE
 * STATSFILE gets 4 u64s updated in place: [0] frames sent, [1] send errors.
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

#define BATCH 64

static uint16_t csum16(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint32_t s = 0;

    for (size_t i = 0; i + 1 < n; i += 2)
        s += (uint32_t)(b[i] << 8 | b[i + 1]);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

int main(int argc, char **argv)
{
    static uint8_t frame[9018];
    struct sockaddr_ll sll = { .sll_family = AF_PACKET };
    struct mmsghdr msgs[BATCH];
    struct iovec iov;
    uint64_t *stats;
    int fd, sfd, one = 1, sndbuf = 64 << 20;
    unsigned size;

    if (argc != 4) {
        fprintf(stderr, "usage: pktsrc IFNAME FRAME_SIZE STATSFILE\n");
        return 2;
    }
    size = (unsigned)atoi(argv[2]);
    if (size < 60 || size > sizeof(frame)) {
        fprintf(stderr, "pktsrc: frame size must be 60..%zu\n", sizeof(frame));
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

    /* Ethernet: to the "guest" MAC, from a local one; IPv4/UDP 198.18.0.1 -> .2 */
    const uint8_t dst[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
    const uint8_t src[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };
    uint8_t *ip = frame + 14, *udp = ip + 20;
    uint16_t iplen = (uint16_t)(size - 14), udplen = (uint16_t)(size - 34);

    memcpy(frame, dst, 6);
    memcpy(frame + 6, src, 6);
    frame[12] = 0x08;
    frame[13] = 0x00;
    ip[0] = 0x45;
    ip[2] = iplen >> 8;
    ip[3] = iplen & 0xff;
    ip[8] = 64;
    ip[9] = 17;
    memcpy(ip + 12, (uint8_t[]){ 198, 18, 0, 1 }, 4);
    memcpy(ip + 16, (uint8_t[]){ 198, 18, 0, 2 }, 4);
    uint16_t c = csum16(ip, 20);
    ip[10] = c >> 8;
    ip[11] = c & 0xff;
    udp[0] = 0x04; udp[1] = 0xd2;       /* 1234 -> 5678, checksum 0 (none) */
    udp[2] = 0x16; udp[3] = 0x2e;
    udp[4] = udplen >> 8;
    udp[5] = udplen & 0xff;

    fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);     /* protocol 0: send only */
    if (fd < 0) {
        perror("pktsrc: socket");
        return 1;
    }
    sll.sll_ifindex = (int)if_nametoindex(argv[1]);
    if (!sll.sll_ifindex) {
        fprintf(stderr, "pktsrc: no interface %s\n", argv[1]);
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

    iov.iov_base = frame;
    iov.iov_len = size;
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
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
