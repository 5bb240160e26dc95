/*
 * pinger.c — benchmark helper: round-trip latency through a backend.
 *
 * From the host side of a TAP (inside the benchmark's namespace) it sends one
 * 64-byte ping frame (frames.h, EtherType 0x88b5, carrying a sequence number)
 * through an AF_PACKET socket, waits for the same sequence number to come back
 * (the guest-side echo — vufront echo, or tapraw echo for the raw limit — swaps
 * the MACs and returns it through the backend), and takes CLOCK_MONOTONIC around
 * the pair. One frame in flight at a time; WARMUP pings first, not recorded. A
 * ping with no answer within 200 ms counts as lost.
 *
 * Usage: pinger IFNAME COUNT WARMUP
 * Prints one line of JSON: {"n", "lost", "min_us", "p50_us", "p90_us", "p99_us", "max_us"}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "frames.h"

static double now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

static double pct(const double *v, int n, double p)
{
    int i = (int)(p * (n - 1) + 0.5);

    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

int main(int argc, char **argv)
{
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(BENCH_PING_TYPE) };
    uint8_t out[BENCH_PING_LEN], in[2048];
    int count, warmup, fd, n = 0, lost = 0;
    double *rtt;

    if (argc != 4 || (count = atoi(argv[2])) < 1 || (warmup = atoi(argv[3])) < 0) {
        fprintf(stderr, "usage: pinger IFNAME COUNT WARMUP\n");
        return 2;
    }
    rtt = calloc((size_t)count, sizeof(*rtt));
    fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(BENCH_PING_TYPE));
    sll.sll_ifindex = (int)if_nametoindex(argv[1]);
    if (fd < 0 || !rtt || !sll.sll_ifindex || bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("pinger: socket/bind");
        return 1;
    }
    for (uint64_t seq = 1; n < count; seq++) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        double t0, t1;
        int got = 0;

        bench_ping_frame(out, seq);
        t0 = now_us();
        if (send(fd, out, sizeof(out), 0) != (ssize_t)sizeof(out)) {
            perror("pinger: send");
            return 1;
        }
        while (!got) {
            struct sockaddr_ll from;
            socklen_t fl = sizeof(from);
            int left = 200 - (int)((now_us() - t0) / 1000);
            ssize_t r;
            uint64_t s;

            if (left <= 0 || poll(&pfd, 1, left) <= 0)
                break;
            r = recvfrom(fd, in, sizeof(in), MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
            if (r < 14 + 8 || from.sll_pkttype == PACKET_OUTGOING)
                continue;
            memcpy(&s, in + 14, 8);
            if (s == seq && !memcmp(in, bench_host_mac, 6))
                got = 1;
        }
        t1 = now_us();
        if ((int)seq <= warmup)
            continue;
        if (got)
            rtt[n++] = t1 - t0;
        else if (++lost > count / 10 + 10) {
            fprintf(stderr, "pinger: too many lost pings (%d)\n", lost);
            break;
        }
    }
    if (n == 0) {
        printf("{\"n\": 0, \"lost\": %d}\n", lost);
        return 1;
    }
    qsort(rtt, (size_t)n, sizeof(*rtt), cmp);
    printf("{\"n\": %d, \"lost\": %d, \"min_us\": %.2f, \"p50_us\": %.2f, \"p90_us\": %.2f, "
           "\"p99_us\": %.2f, \"max_us\": %.2f}\n", n, lost, rtt[0], pct(rtt, n, 0.5),
           pct(rtt, n, 0.9), pct(rtt, n, 0.99), rtt[n - 1]);
    return 0;
}
