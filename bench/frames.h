/*
 * frames.h — the benchmark's test frames, shared by its C helpers (pktsrc, tapraw,
 * vufront, pinger) so every contender carries byte-identical traffic.
 *
 * - UDP/IPv4 frames of a given Ethernet size (no FCS): 02:00:00:00:00:01 ->
 *   52:54:00:12:34:56, 198.18.0.1 -> 198.18.0.2 (RFC 2544 benchmarking range, never
 *   routed), UDP 1234+flow -> 5678, checksum 0. `flow` varies the source port so a
 *   multi-queue TAP spreads the frames over its queues (tun picks a queue by flow hash).
 * - One TCP/IPv4 GSO frame: Ethernet + IPv4 + TCP header + BENCH_GSO_PAYLOAD bytes,
 *   with the virtio_net_hdr_v1 (12 bytes, virtio 1.2 §5.1.6) that asks for
 *   segmentation (GSO_TCPV4, gso_size BENCH_GSO_MSS) and a partial checksum
 *   (NEEDS_CSUM at the TCP checksum field) — what a Linux guest hands its NIC.
 * - Ping frames (EtherType 0x88b5, IEEE "local experimental"): 64 bytes carrying a
 *   sequence number; the echo on the far side swaps the MAC addresses.
 */
#ifndef BENCH_FRAMES_H
#define BENCH_FRAMES_H

#include <stdint.h>
#include <string.h>

#define BENCH_VNET_HDR_LEN 12
#define BENCH_GSO_MSS 1448
#define BENCH_GSO_PAYLOAD (45 * BENCH_GSO_MSS)          /* 65160 B: "64 KB" of TCP payload */
#define BENCH_GSO_FRAME (14 + 20 + 20 + BENCH_GSO_PAYLOAD)
#define BENCH_PING_TYPE 0x88b5
#define BENCH_PING_LEN 64

struct bench_vnet_hdr {                 /* virtio_net_hdr_v1, little endian (x86) */
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers;
} __attribute__((packed));

static const uint8_t bench_guest_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
static const uint8_t bench_host_mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };

static inline uint16_t bench_csum16(const uint8_t *b, size_t n)
{
    uint32_t s = 0;

    for (size_t i = 0; i + 1 < n; i += 2)
        s += (uint32_t)(b[i] << 8 | b[i + 1]);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static inline void bench_put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Ethernet + IPv4 header for an IP packet of `iplen` bytes of protocol `proto`. */
static inline void bench_eth_ip(uint8_t *f, unsigned iplen, uint8_t proto)
{
    uint8_t *ip = f + 14;

    memcpy(f, bench_guest_mac, 6);
    memcpy(f + 6, bench_host_mac, 6);
    bench_put16(f + 12, 0x0800);
    memset(ip, 0, 20);
    ip[0] = 0x45;
    bench_put16(ip + 2, (uint16_t)iplen);
    ip[6] = 0x40;                       /* DF */
    ip[8] = 64;
    ip[9] = proto;
    memcpy(ip + 12, (uint8_t[]){ 198, 18, 0, 1 }, 4);
    memcpy(ip + 16, (uint8_t[]){ 198, 18, 0, 2 }, 4);
    bench_put16(ip + 10, bench_csum16(ip, 20));
}

/* A UDP frame of `size` (60..9018) Ethernet bytes; the payload is left as it is. */
static inline void bench_udp_frame(uint8_t *f, unsigned size, unsigned flow)
{
    uint8_t *udp = f + 34;

    bench_eth_ip(f, size - 14, 17);
    bench_put16(udp, (uint16_t)(1234 + flow));
    bench_put16(udp + 2, 5678);
    bench_put16(udp + 4, (uint16_t)(size - 34));
    bench_put16(udp + 6, 0);
}

/* The vnet header + TCP GSO frame (BENCH_GSO_FRAME bytes after the header). */
static inline void bench_gso_frame(struct bench_vnet_hdr *h, uint8_t *f, unsigned flow)
{
    uint8_t *tcp = f + 34;

    memset(h, 0, sizeof(*h));
    h->flags = 1;                       /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
    h->gso_type = 1;                    /* VIRTIO_NET_HDR_GSO_TCPV4 */
    h->hdr_len = 54;
    h->gso_size = BENCH_GSO_MSS;
    h->csum_start = 34;
    h->csum_offset = 16;
    bench_eth_ip(f, 20 + 20 + BENCH_GSO_PAYLOAD, 6);
    memset(tcp, 0, 20);
    bench_put16(tcp, (uint16_t)(40000 + flow));
    bench_put16(tcp + 2, 5001);
    tcp[12] = 5 << 4;                   /* data offset 5 words */
    tcp[13] = 0x18;                     /* PSH|ACK */
    bench_put16(tcp + 14, 65535);
    /* NEEDS_CSUM: the checksum field holds the folded pseudo-header sum (not
     * inverted), as Linux's own TCP leaves it: addresses, protocol, TCP length */
    {
        uint32_t s = (198 << 8) + 18 + 1 + (198 << 8) + 18 + 2 + 6 + 20 + BENCH_GSO_PAYLOAD;

        while (s >> 16)
            s = (s & 0xffff) + (s >> 16);
        bench_put16(tcp + 16, (uint16_t)s);
    }
}

/* A ping frame with sequence number `seq` (host -> guest direction). */
static inline void bench_ping_frame(uint8_t *f, uint64_t seq)
{
    memset(f, 0, BENCH_PING_LEN);
    memcpy(f, bench_guest_mac, 6);
    memcpy(f + 6, bench_host_mac, 6);
    bench_put16(f + 12, BENCH_PING_TYPE);
    memcpy(f + 14, &seq, 8);
}

/* The echo: swap destination and source MAC addresses in place. */
static inline void bench_swap_macs(uint8_t *f)
{
    uint8_t t[6];

    memcpy(t, f, 6);
    memcpy(f, f + 6, 6);
    memcpy(f + 6, t, 6);
}

#endif
