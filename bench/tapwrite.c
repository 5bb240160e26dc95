/*
 * tapwrite — the raw TAP write ceiling on this kernel, for docs/notes/perf-changes.md.
 *
 * Writes 64-byte (or -s SIZE) Ethernet frames with a 12-byte vnet header into a
 * TAP as fast as one thread can, the way vhostd's TX does, and prints frames per
 * second and CPU microseconds per frame (getrusage of the process):
 *
 *   tapwrite -i TAP [-t SECONDS] [-s SIZE] [-m write|writev|uring] [-b BATCH] [-n]
 *
 *   write   one write(2) per frame (the frame copied behind a header: 1 iovec)
 *   writev  one writev(2) per frame, header and frame as two iovecs (vhostd's syscall mode)
 *   uring   BATCH writev requests per io_uring_enter(2) (vhostd's io_uring mode;
 *           the same csrc/vr_uring.h)
 *   -n      glibc writev() instead of syscall(SYS_writev) (writev mode only)
 *
 * The TAP is created (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, TUNSETVNETHDRSZ 12,
 * O_NONBLOCK) in the current network namespace and brought up; run it inside a
 * throw-away namespace: `ip netns exec NS taskset -c 1 ./tapwrite -i tw0`.
 * Frames are IPv4/UDP 198.18.0.1 -> 198.18.0.2 to a foreign MAC, like testpmd's
 * txonly frames, so the kernel drops them where it drops the benchmark's.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../csrc/vr_uring.h"

#define NBUF 1024
#define BUFSZ 2048

static void *idle_thread(void *arg)
{
    pause();
    return arg;
}

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

static int open_tap(const char *name, bool napi)
{
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC), s, hl = 12;

    if (fd < 0) {
        perror("/dev/net/tun");
        exit(1);
    }
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (napi ? IFF_NAPI : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETVNETHDRSZ, &hl) < 0) {
        perror("TUNSETIFF");
        exit(1);
    }
    s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        perror("SIOCGIFFLAGS");
        exit(1);
    }
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) {
        perror("SIOCSIFFLAGS");
        exit(1);
    }
    close(s);
    return fd;
}

static void fill_frame(uint8_t *f, unsigned size, unsigned seq)
{
    static const uint8_t head[] = {
        0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00,       /* Ethernet */
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,  /* IPv4 */
        0x04, 0x00, 0x04, 0x01, 0, 0, 0, 0,                              /* UDP */
    };
    unsigned ip_len = size - 14;

    memset(f, 0, size);
    memcpy(f, head, sizeof(head));
    f[16] = ip_len >> 8;
    f[17] = ip_len & 0xff;
    f[38] = (ip_len - 20) >> 8;
    f[39] = (ip_len - 20) & 0xff;
    f[size - 1] = (uint8_t)seq;
}

int main(int argc, char **argv)
{
    const char *ifname = NULL, *mode = "writev";
    double secs = 3, t0, c0, t1, c1;
    unsigned size = 64, batch = 64;
    bool glibc = false, single = false, napi = false, threaded = false, fixed = false;
    uint8_t hdr[12] = { 0 };
    static uint8_t bufs[NBUF][BUFSZ];
    static struct iovec iov[NBUF][2], one[NBUF];
    unsigned long frames = 0, errs = 0;
    struct vr_uring ring;
    int opt, fd;

    while ((opt = getopt(argc, argv, "i:t:s:m:b:n1NTF")) != -1) {
        switch (opt) {
        case 'i': ifname = optarg; break;
        case 't': secs = atof(optarg); break;
        case 's': size = (unsigned)atoi(optarg); break;
        case 'm': mode = optarg; break;
        case 'b': batch = (unsigned)atoi(optarg); break;
        case 'n': glibc = true; break;
        case '1': single = true; break;
        case 'N': napi = true; break;
        case 'T': threaded = true; break;
        case 'F': fixed = true; break;
        default:
            fprintf(stderr, "usage: %s -i TAP [-t S] [-s SIZE] [-m write|writev|uring] [-b BATCH] [-n]\n", argv[0]);
            return 2;
        }
    }
    if (!ifname || size < 60 || size > BUFSZ - 12 || batch < 1 || batch > NBUF) {
        fprintf(stderr, "tapwrite: need -i TAP, 60 <= SIZE <= %d, 1 <= BATCH <= %d\n", BUFSZ - 12, NBUF);
        return 2;
    }
    fd = open_tap(ifname, napi);
    for (unsigned k = 0; k < NBUF; k++) {
        fill_frame(bufs[k] + 12, size, k);      /* bufs[k][0..12) = vnet header for "write" */
        iov[k][0].iov_base = hdr;
        iov[k][0].iov_len = 12;
        iov[k][1].iov_base = bufs[k] + 12;
        iov[k][1].iov_len = size;
        one[k].iov_base = bufs[k];
        one[k].iov_len = 12 + size;
    }
    if (!strcmp(mode, "uring")) {
        int r = vr_uring_init(&ring, batch);

        if (r < 0) {
            fprintf(stderr, "io_uring_setup: %s\n", strerror(-r));
            return 1;
        }
        if (fixed && vr_uring_register_fd(&ring, fd) < 0) {
            perror("IORING_REGISTER_FILES");
            return 1;
        }
    }
    if (threaded) {
        pthread_t t;

        pthread_create(&t, NULL, idle_thread, NULL);
    }
    usleep(200000);
    t0 = now();
    c0 = cpu_s();
    for (unsigned k = 0;; ) {
        if (!strcmp(mode, "uring")) {
            unsigned sub;
            struct io_uring_cqe *cqe;

            for (unsigned j = 0; j < batch; j++, k = (k + 1) % NBUF)
                if (single) {
                    vr_uring_prep_rw(&ring, IORING_OP_WRITE, fd, (const struct iovec *)(void *)bufs[k], 12 + size, k);
                } else
                    vr_uring_prep_rw(&ring, IORING_OP_WRITEV, fd, iov[k], 2, k);
            if (vr_uring_submit_wait(&ring, &sub) < 0) {
                perror("io_uring_enter");
                return 1;
            }
            while ((cqe = vr_uring_peek(&ring))) {
                if (cqe->res < 0)
                    errs++;
                else
                    frames++;
                vr_uring_cqe_seen(&ring);
            }
        } else {
            for (unsigned j = 0; j < 64; j++, k = (k + 1) % NBUF) {
                ssize_t n;

                if (!strcmp(mode, "write"))
                    n = write(fd, bufs[k], 12 + size);
                else if (!strcmp(mode, "writev1"))
                    n = syscall(SYS_writev, fd, &one[k], 1);
                else if (glibc)
                    n = writev(fd, iov[k], 2);
                else
                    n = syscall(SYS_writev, fd, iov[k], 2);
                if (n < 0)
                    errs++;
                else
                    frames++;
            }
        }
        if (now() - t0 >= secs)
            break;
    }
    t1 = now();
    c1 = cpu_s();
    if (!strcmp(mode, "uring"))
        vr_uring_free(&ring);
    printf("%s%s%s%s size=%u batch=%u%s: %.3f Mpps, %.3f us CPU/frame, cpu %.0f%%, errors %lu\n", mode,
           single ? " (IORING_OP_WRITE, 1 buffer)" : "", fixed ? " fixed-file" : "",
           threaded ? " +1 thread" : "", size,
           !strcmp(mode, "uring") ? batch : 1, glibc ? " glibc" : "", frames / (t1 - t0) / 1e6,
           (c1 - c0) / (frames ? frames : 1) * 1e6, (c1 - c0) / (t1 - t0) * 100, errs);
    return 0;
}
