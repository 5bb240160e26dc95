/*
 * vr_internal.h — private to the C datapath (never read by cffi).
 *
 * Owns: the one guest-address translation function (vr_xlate), the named memory
 * barriers, guest-shared access helpers, the split-ring layout (virtio 1.1 §2.6),
 * and the queue-pair / virtqueue structures shared by vring_split.c, net_tx.c,
 * net_rx.c, worker.c and qp_control.c.
 *
 * Byte order: the guest is assumed little-endian, which is what VERSION_1 requires
 * and what legacy x86/arm64 guests are. Ring and vnet-header fields are used as
 * native integers; the static assert below keeps a big-endian build from silently
 * misreading them.
 */
#ifndef VR_INTERNAL_H
#define VR_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vhostd.h"
#include "vr_uring.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "vhostd datapath assumes a little-endian host (virtio 1.x rings are LE)");

/* ---------------------------------------------------------------- barriers */

/* After reading avail->idx, before reading avail->ring[] and descriptors (load->load). */
#define vr_acquire_after_avail_idx() __atomic_thread_fence(__ATOMIC_ACQUIRE)
/* After writing used->ring[] entries, before publishing used->idx (store->store). */
#define vr_release_before_used_idx() __atomic_thread_fence(__ATOMIC_RELEASE)
/*
 * Between a store the guest must see (used->flags / avail_event / used->idx) and a
 * load of something the guest writes (avail->idx / avail->flags / used_event):
 * store->load ordering needs a full fence (virtio 1.1 §2.6.7.1, §2.6.10).
 */
#define vr_full_fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Guest-shared scalars: one access, never re-read or torn by the compiler. */
static inline uint16_t vr_ld16(const volatile uint16_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline uint32_t vr_ld32(const volatile uint32_t *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}

static inline uint64_t vr_ld64(const volatile uint64_t *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
}

static inline void vr_st16(volatile uint16_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

/*
 * The per-frame TAP syscalls, raw. glibc's readv()/writev() are cancellation
 * points: in a threaded process each call is bracketed by
 * __pthread_enable/disable_asynccancel (two atomic read-modify-writes). The
 * worker is never cancelled (vr_qp_free() stops it through its control
 * eventfd), so that bookkeeping buys nothing. Same result and errno contract
 * as the wrappers: -1 with errno set on failure.
 */
static inline ssize_t vr_sys_writev(int fd, const struct iovec *iov, int iovcnt)
{
    return syscall(SYS_writev, fd, iov, iovcnt);
}

static inline ssize_t vr_sys_write(int fd, const void *buf, size_t len)
{
    return syscall(SYS_write, fd, buf, len);
}

static inline ssize_t vr_sys_readv(int fd, const struct iovec *iov, int iovcnt)
{
    return syscall(SYS_readv, fd, iov, iovcnt);
}

/* ---------------------------------------------------------- split ring layout */

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];            /* [num], then used_event */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];  /* [num], then avail_event (u16) */
};

_Static_assert(sizeof(struct vring_desc) == 16, "desc layout");
_Static_assert(sizeof(struct vring_used_elem) == 8, "used elem layout");

/* Byte sizes the rings occupy with EVENT_IDX fields included (§2.6). */
static inline uint64_t vr_desc_bytes(uint32_t num) { return 16ull * num; }
static inline uint64_t vr_avail_bytes(uint32_t num) { return 6ull + 2ull * num; }
static inline uint64_t vr_used_bytes(uint32_t num) { return 6ull + 8ull * num; }

/* virtio 1.1 §2.6.7.2: u16 wrap-around arithmetic, as in Linux's vring_need_event(). */
static inline bool vr_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---------------------------------------------------------------- translation */

/*
 * THE translation function: every guest address the datapath touches goes through
 * here. Returns the host pointer for `addr` in `space` and clamps *len to the bytes
 * contiguous in that region, or NULL if `addr` is in no region. Never computes
 * addr + len, so no input can overflow; zero-sized regions never match.
 *
 * Guest-physical lookups (the datapath's, per descriptor) try `hint` first (the
 * region the caller's last lookup hit: buffers cluster) and otherwise binary-
 * search the gpa-sorted table, so hundreds of regions cost a few comparisons.
 * An unsorted table (which vr_mem_validate refuses) can only miss, never overrun.
 * Frontend-virtual lookups happen on the control path (ring addresses at map
 * time) and scan the table.
 */
static inline const struct vr_region *vr_find_gpa(const struct vr_mem *mem, uint64_t addr, uint32_t *hint)
{
    uint32_t n = mem->nregions < VR_MAX_REGIONS ? mem->nregions : VR_MAX_REGIONS;
    uint32_t lo = 0, hi = n;
    const struct vr_region *r;

    if (hint && *hint < n) {
        r = &mem->regions[*hint];
        if (addr >= r->gpa && addr - r->gpa < r->size)
            return r;
    }
    while (lo < hi) {                   /* first region whose gpa is above addr */
        uint32_t mid = lo + (hi - lo) / 2;

        if (mem->regions[mid].gpa <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    r = &mem->regions[lo - 1];
    if (addr - r->gpa >= r->size)       /* also rejects size == 0 */
        return NULL;
    if (hint)
        *hint = lo - 1;
    return r;
}

static inline void *vr_xlate_gpa(const struct vr_mem *mem, uint32_t *hint, uint64_t addr, uint64_t *len)
{
    const struct vr_region *r = vr_find_gpa(mem, addr, hint);
    uint64_t off;

    if (!r)
        return NULL;
    off = addr - r->gpa;
    if (*len > r->size - off)
        *len = r->size - off;
    return (void *)(uintptr_t)(r->hva + off);
}

static inline void *vr_xlate(const struct vr_mem *mem, int space, uint64_t addr, uint64_t *len)
{
    uint32_t n = mem->nregions;

    if (space == VR_SPACE_GPA)
        return vr_xlate_gpa(mem, NULL, addr, len);
    if (n > VR_MAX_REGIONS)
        n = VR_MAX_REGIONS;
    for (uint32_t i = 0; i < n; i++) {
        const struct vr_region *r = &mem->regions[i];
        uint64_t off;

        if (addr < r->uva)
            continue;
        off = addr - r->uva;
        if (off >= r->size)             /* also rejects size == 0 */
            continue;
        if (*len > r->size - off)
            *len = r->size - off;
        return (void *)(uintptr_t)(r->hva + off);
    }
    return NULL;
}

/* Guest-physical address of frontend virtual address `uva` (control path only:
 * ring addresses at map time, so that log marks need no lookup); 0 if unmapped. */
static inline uint64_t vr_uva_to_gpa(const struct vr_mem *mem, uint64_t uva)
{
    uint32_t n = mem->nregions < VR_MAX_REGIONS ? mem->nregions : VR_MAX_REGIONS;

    for (uint32_t i = 0; i < n; i++) {
        const struct vr_region *r = &mem->regions[i];

        if (uva >= r->uva && uva - r->uva < r->size)
            return r->gpa + (uva - r->uva);
    }
    return 0;
}

/*
 * Host pointer for a ring part (desc table, avail/used ring, event structures) at
 * frontend virtual address `uva`: it must lie entirely in one region and be aligned
 * as the spec requires (§2.6 split, §2.7.10.1 packed); NULL otherwise.
 */
static inline void *vr_map_ring_part(const struct vr_mem *mem, uint64_t uva, uint64_t size, uintptr_t align)
{
    uint64_t l = size;
    void *p = vr_xlate(mem, VR_SPACE_UVA, uva, &l);

    if (!p || l < size || ((uintptr_t)p & (align - 1)))
        return NULL;
    return p;
}

/*
 * Appends the guest range [addr, addr+len) to iov[*niov..max), one iovec per
 * region it crosses; gpa (if not NULL) gets each iovec's guest-physical address
 * at the same index, for the dirty log (no reverse lookup later). 0, -EFAULT
 * (some byte unmapped or the range wraps), or -ENOBUFS (more than `max` iovecs).
 */
static inline int vr_gather(const struct vr_mem *mem, uint32_t *hint, uint64_t addr, uint64_t len,
                            struct iovec *iov, uint64_t *gpa, unsigned *niov, unsigned max)
{
    while (len) {
        uint64_t l = len;
        void *p = vr_xlate_gpa(mem, hint, addr, &l);

        if (!p || l == 0)
            return -EFAULT;
        if (*niov >= max)
            return -ENOBUFS;
        iov[*niov].iov_base = p;
        iov[*niov].iov_len = (size_t)l;
        if (gpa)
            gpa[*niov] = addr;
        (*niov)++;
        len -= l;
        if (len && addr + l < addr)
            return -EFAULT;
        addr += l;
    }
    return 0;
}

/* ---------------------------------------------------------------- queue state */

struct vr_qp;
struct vr_vq;

struct vring_packed_desc;
struct vring_packed_event;

struct vr_vq {
    /* configuration: written by the control plane only while the worker is parked */
    uint32_t num;                       /* 0: not set; split: a power of two */
    bool addr_set;
    uint64_t desc_uva, avail_uva, used_uva;
    int kick_fd, call_fd, err_fd;
    bool started, enabled;
    const struct vr_ring_ops *ops;      /* split or packed, from the features */

    /* dirty log (VHOST_VRING_F_LOG): where the device's ring writes land in
     * guest-physical space, fixed by vr_qp_map() / vr_qp_set_log_addr() */
    bool log_addr_set;                  /* SET_VRING_ADDR carried VHOST_VRING_F_LOG */
    uint64_t log_guest_addr;            /* its log_guest_addr: split used ring's gpa */
    uint64_t used_gpa;                  /* split: used ring; packed: device event area */
    uint64_t desc_gpa;                  /* packed: descriptor ring (written back) */

    /* rings as mapped by vr_qp_map() (host pointers into guest memory) */
    bool mapped;
    volatile struct vring_desc *desc;               /* split */
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    volatile struct vring_packed_desc *pdesc;       /* packed: descriptor ring */
    volatile struct vring_packed_event *driver_event;  /* packed: driver area */
    volatile struct vring_packed_event *device_event;  /* packed: device area */

    /* device-side ring state (worker-owned while running) */
    uint16_t last_avail_idx;            /* split: free-running; packed: slot < num */
    uint16_t used_idx;                  /* split: shadow of used->idx; packed: next used slot */
    uint16_t published_used_idx;        /* split: last value stored to used->idx */
    uint16_t signalled_used;            /* split: used idx at the last call decision (EVENT_IDX) */
    bool signalled_valid;
    bool avail_wrap, used_wrap;         /* packed wrap counters (§2.7.1) */
    bool used_pending;                  /* packed: first used desc of the batch not yet flagged */
    uint16_t pending_slot, pending_flags;
    uint16_t device_event_flags;        /* packed: shadow of what we wrote there */
    uint32_t used_since_signal;         /* packed: descriptors used since the last call decision */

    struct vr_vq_stats stats;
    struct vr_vq_saved *saved;          /* vr_qp_set_saved(): where positions are published */
};

/* One popped chain: readable iovecs iov[0..nout), writable iov[nout..niov). */
struct vr_chain {
    uint16_t head;                      /* split: head descriptor; packed: buffer id */
    uint16_t ndesc;                     /* packed: ring slots the chain occupies */
    uint32_t pos;                       /* avail position before the pop (rewind target) */
    unsigned iov_first;                 /* RX stash: where its iovecs start in rx_iov */
    unsigned niov;
    unsigned nout;
    uint64_t out_len;
    uint64_t in_len;
};

/* pop() results besides 1 (chain) and 0 (ring empty) */
#define VR_POP_BROKEN (-1)              /* malformed: the vq is now broken */
#define VR_POP_NOSPACE (-2)             /* chain needs more iovecs than offered; not consumed */

/*
 * The ring-kind interface the net code is written against (vring_split.c and
 * vring_packed.c each provide one table; vr_vq_select_ops() picks one per vq from
 * the negotiated features while the worker is parked). Positions handed to
 * rewind() come from vr_chain.pos, so a caller can give back any suffix of the
 * chains it popped (MRG_RXBUF) in one call.
 */
struct vr_ring_ops {
    int (*map)(const struct vr_mem *mem, struct vr_vq *vq);
    int (*pop)(struct vr_qp *qp, struct vr_vq *vq, struct iovec *iov, uint64_t *gpa, unsigned max_iov,
               struct vr_chain *c);
    void (*rewind)(struct vr_vq *vq, const struct vr_chain *c);
    void (*push)(struct vr_qp *qp, struct vr_vq *vq, const struct vr_chain *c, uint32_t len);
    void (*flush)(struct vr_qp *qp, struct vr_vq *vq);
    void (*disable_notify)(struct vr_qp *qp, struct vr_vq *vq);
    bool (*enable_notify)(struct vr_qp *qp, struct vr_vq *vq);
    int (*set_base)(struct vr_vq *vq, uint32_t base);
    uint32_t (*get_base)(const struct vr_vq *vq);
    void (*init_state)(struct vr_vq *vq);
};

#define VR_BURST 128                    /* chains per burst before publish + call */
#define VR_LOG_CACHE 32                 /* log words gathered per burst before the atomic ORs */

/*
 * TX bounce buffers: a frame (vnet header + packet) of at most tx_copy_max bytes
 * is copied out of guest memory into its slot's bounce buffer and written with
 * one write() / IORING_OP_WRITE (see net_tx.c). One slot per in-flight request,
 * cache-line aligned; VR_TX_COPY_LIMIT is the largest threshold accepted.
 */

/*
 * TX in io_uring mode: the chains of one burst, popped and validated first, their
 * writev()s submitted together, and returned used only after every completion
 * (the kernel reads guest memory until then). hdr is the local, validated copy of
 * the vnet header that the TAP gets as iov[0] (it must outlive the submit).
 */
struct vr_tx_slot {
    struct vr_chain c;
    uint8_t hdr[12] __attribute__((aligned(8)));
    uint32_t frame_len;
    unsigned iov_first, iov_cnt;        /* the request's iovecs in tx_iov */
    int32_t res;                        /* bytes written or -errno */
    bool send;                          /* false: dropped before the TAP (already counted) */
    bool copied;                        /* the frame is in tx_bounce[slot]: one write() */
};

/* epoll tags (epoll_event.data.u32) */
#define VR_EV_CTRL 0
#define VR_EV_KICK_RX 1
#define VR_EV_KICK_TX 2
#define VR_EV_TAP 3

struct vr_qp {
    struct vr_mem *mem;
    uint32_t xlate_hint;                /* region of the last guest-physical lookup */
    int tap_fd;
    int io_mode;                        /* asked for by vr_qp_new(), then what the worker got */
    int io_error;                       /* errno io_uring set-up failed with, 0 if not tried or fine */
    bool io_ready;                      /* under lock: io_mode is final */
    struct vr_uring ring;               /* VR_IO_URING: the worker's ring, TAP fd registered */
    uint32_t busy_poll_us;              /* 0: sleep in epoll as soon as there is no work */
    int cpu;                            /* CPU the worker is pinned to, -1: any */
    bool tap_is_socket;                 /* test stand-in: recvmsg() reports MSG_TRUNC */
    uint64_t features;
    uint32_t vnet_hdr_len;
    uint32_t tx_copy_max;               /* frames up to this many bytes (header included) are copied */
    uint64_t tx_copied;                 /* frames that went through tx_bounce (vr_qp_tx_copied) */
    uint64_t idle_waits;                /* epoll waits without timeout (vr_qp_idle_waits) */
    struct vr_vq vq[2];

    int epfd, ctrl_fd, event_fd;
    int kick_watched[2];                /* fd registered in epoll per vq, or -1 */
    bool tap_watched;
    bool tap_dead;                      /* TAP reported HUP/ERR or EOF: unwatched until resume */

    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;                /* CLOCK_MONOTONIC, for vr_qp_pause's deadline */
    unsigned pause_req;                 /* nested pause count (under lock) */
    bool parked;                        /* worker is parked (under lock) */
    bool stop;                          /* under lock */
    bool stuck;                         /* under lock: missed a pause deadline (vr_qp_pause) */
    uint64_t nudges;                    /* under lock: VR_SIG_NUDGEs sent to the worker */
    uint32_t test_stall_ms;             /* vr_qp_test_stall(): spin this long before the next pass */

    uint32_t mtu;                       /* vr_qp_set_mtu(); 1500 by default */
    uint32_t rx_need;                   /* MRG_RXBUF: bytes of buffers to gather per frame */

    /* Dirty-page log (live migration): see "dirty log" below. */
    volatile uint64_t *log;             /* the frontend's bitmap, mapped; NULL: none */
    uint64_t log_words;                 /* its size in u64 words */
    bool log_on;                        /* log set and VHOST_F_LOG_ALL negotiated */
    unsigned log_cache_n;
    struct { uint64_t word, bits; } log_cache[VR_LOG_CACHE];
    uint64_t log_marks;                 /* pages whose bit this qp turned on */
    uint64_t log_overflow;              /* marks beyond the log's end (dropped) */

    struct vr_capture *capture;         /* vhostctl capture: frames are copied here; NULL: off */

    /* per-qp scratch: no allocation per packet */
    struct iovec tx_iov[VR_MAX_IOV];
    struct vr_tx_slot tx_slot[VR_BURST];
    struct iovec rx_iov[VR_MAX_IOV];
    uint64_t rx_gpa[VR_MAX_IOV];        /* guest-physical address of each rx_iov, for the log */
    /* RX: chains popped but not yet used, rx_stash[stash_first..+stash_count); their
     * iovecs are rx_iov[rx_stash[stash_first].iov_first .. stash_iov_end). Given
     * back (rewound) at the end of every burst, so it is empty while parked. */
    struct vr_chain rx_stash[VR_MAX_IOV];
    unsigned stash_first, stash_count, stash_iov_end;
    uint64_t stash_bytes;
    /* TX bounce buffers, one per tx_slot (the struct is allocated 64-aligned) */
    uint8_t tx_bounce[VR_BURST][VR_TX_COPY_LIMIT] __attribute__((aligned(64)));
};

static inline bool vr_has_feature(const struct vr_qp *qp, unsigned bit)
{
    return (qp->features >> bit) & 1;
}

/* A vq the worker may service: configured, mapped, started, not broken. */
static inline bool vr_vq_ready(const struct vr_vq *vq)
{
    return vq->num && vq->mapped && vq->started && !vq->stats.broken;
}

static inline void vr_hist_add(struct vr_vq_stats *s, unsigned n)
{
    unsigned b = 0;

    if (!n)
        return;
    while (b < 7 && (n >> (b + 1)))
        b++;
    s->batch_hist[b]++;
    s->batch_sum += n;
}

/* vring_split.c / vring_packed.c */
extern const struct vr_ring_ops vr_split_ops;
extern const struct vr_ring_ops vr_packed_ops;

/*
 * Signals eventfd `fd` (a call or err fd, or our own event fd); -1 is no fd.
 * The frontend's fds are used in the mode it chose (the O_NONBLOCK flag lives
 * on the file description it shares; changing it would change its own reads).
 * Non-blocking, a full counter answers EAGAIN: the reader has a wake-up
 * pending anyway, so nothing is lost. Blocking, a write to a full counter
 * (0xfffffffffffffffe, which only a hostile frontend reaches) sleeps, and only
 * the control plane's nudge (vr_qp_pause sends the worker VR_SIG_NUDGE) ends
 * it, with EINTR. false in that case: the fd is hostile and its vq must stop
 * (VR_BROKEN_NOTIFY). Until the next pause only this frontend's own queue
 * pair waits.
 */
static inline bool vr_efd_signal(int fd)
{
    uint64_t one = 1;

    if (fd < 0)
        return true;
    return !(write(fd, &one, sizeof(one)) < 0 && errno == EINTR);
}

/*
 * Stops servicing vq: counted once, the reason published for the control plane
 * (which logs it once when qp->event_fd fires) and the frontend's err fd
 * signalled. Idempotent: the first reason stays.
 */
static inline void vr_vq_set_broken(struct vr_qp *qp, struct vr_vq *vq, uint32_t why, uint32_t detail)
{
    if (vq->stats.broken)
        return;
    vq->stats.broken_detail = detail;
    vq->stats.drop_bad_desc++;
    /* release: the detail is visible before the reason the control plane polls. */
    __atomic_store_n(&vq->stats.broken, why, __ATOMIC_RELEASE);
    (void)vr_efd_signal(vq->err_fd);    /* a blocked err fd only loses the frontend its notice */
    (void)vr_efd_signal(qp->event_fd);
}

/* The call after a flush that decided to interrupt the guest: counted, and a
 * call fd that blocked (see vr_efd_signal) stops the vq. */
static inline void vr_vq_call(struct vr_qp *qp, struct vr_vq *vq)
{
    if (vq->call_fd < 0)
        return;
    vq->stats.calls++;
    if (!vr_efd_signal(vq->call_fd))
        vr_vq_set_broken(qp, vq, VR_BROKEN_NOTIFY, VR_NOTIFY_CALL);
}

/* ----------------------------------------------------------------- dirty log */

/*
 * vhost-user spec, "Migration": while VHOST_F_LOG_ALL is negotiated, every guest
 * page the device writes is marked in the frontend's bitmap, 1 bit per 4 KiB
 * guest-physical page (bit p % 64 of u64 word p / 64). The frontend reads and
 * clears words concurrently (atomic exchange), so a mark is an atomic OR, and it
 * comes after the write it covers: a page harvested between the write and the
 * mark is marked again and copied again. Marks are gathered per burst in
 * log_cache (few distinct words: rings and buffers are local) and ORed into
 * the bitmap by vr_log_flush() after a release fence, at the end of every burst,
 * so a parked worker holds no unlogged write (GET_VRING_BASE relies on that).
 */
#define VR_LOG_PAGE_SHIFT 12

static inline void vr_log_flush(struct vr_qp *qp)
{
    unsigned n = qp->log_cache_n;

    if (!n)
        return;
    /* release: the guest-memory writes the marks cover are visible first. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (unsigned k = 0; k < n; k++) {
        uint64_t old = __atomic_fetch_or(&qp->log[qp->log_cache[k].word], qp->log_cache[k].bits,
                                         __ATOMIC_RELAXED);

        qp->log_marks += (uint64_t)__builtin_popcountll(qp->log_cache[k].bits & ~old);
    }
    qp->log_cache_n = 0;
}

static inline void vr_log_word(struct vr_qp *qp, uint64_t word, uint64_t bits)
{
    unsigned n = qp->log_cache_n;

    if (word >= qp->log_words) {        /* beyond the log the frontend sized for its memory */
        qp->log_overflow++;
        return;
    }
    for (unsigned k = n; k-- > 0;) {    /* the latest words are the likeliest */
        if (qp->log_cache[k].word == word) {
            qp->log_cache[k].bits |= bits;
            return;
        }
    }
    if (n == VR_LOG_CACHE) {
        vr_log_flush(qp);
        n = 0;
    }
    qp->log_cache[n].word = word;
    qp->log_cache[n].bits = bits;
    qp->log_cache_n = n + 1;
}

/* Marks the pages of guest-physical range [gpa, gpa+len) written (len > 0). */
static inline void vr_log_write(struct vr_qp *qp, uint64_t gpa, uint64_t len)
{
    uint64_t page, last;

    if (!qp->log_on || !len)
        return;
    page = gpa >> VR_LOG_PAGE_SHIFT;
    last = (gpa + len - 1 < gpa ? UINT64_MAX : gpa + len - 1) >> VR_LOG_PAGE_SHIFT;
    while (page <= last) {
        uint64_t word = page >> 6, bits = 0;

        do {
            bits |= 1ull << (page & 63);
        } while (page++ < last && (page & 63));
        vr_log_word(qp, word, bits);
        if (page == 0)                  /* wrapped at the top of the address space */
            break;
    }
}

/* A write of len bytes at offset off of the split used ring / packed device area. */
static inline void vr_log_used(struct vr_qp *qp, const struct vr_vq *vq, uint64_t off, uint64_t len)
{
    if (qp->log_on)
        vr_log_write(qp, (vq->log_addr_set ? vq->log_guest_addr : vq->used_gpa) + off, len);
}

/* Publishes vq's positions (vr_qp_set_saved) if they moved: seq odd, positions,
 * seq even. Stores only: the memory is a tmpfs file that outlives the process. */
static inline void vr_vq_publish(struct vr_vq *vq)
{
    struct vr_vq_saved *s = vq->saved;
    uint32_t base;
    uint16_t avail, used;

    if (!s)
        return;
    base = vq->ops->get_base(vq);
    avail = (uint16_t)base;
    used = vq->ops == &vr_split_ops ? vq->used_idx : (uint16_t)(base >> 16);
    if (s->avail == avail && s->used == used && !(s->seq & 1) && s->seq)
        return;
    __atomic_store_n(&s->seq, s->seq | 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    s->avail = avail;
    s->used = used;
    __atomic_store_n(&s->seq, (s->seq | 1) + 1, __ATOMIC_RELEASE);
}

/* The ring-kind dispatch: one indirect call, the kind chosen once per vq. */
static inline int vr_vq_pop(struct vr_qp *qp, struct vr_vq *vq, struct iovec *iov, uint64_t *gpa,
                            unsigned max_iov, struct vr_chain *c)
{
    return vq->ops->pop(qp, vq, iov, gpa, max_iov, c);
}

static inline void vr_vq_rewind(struct vr_vq *vq, const struct vr_chain *c)
{
    vq->ops->rewind(vq, c);
}

static inline void vr_vq_push(struct vr_qp *qp, struct vr_vq *vq, const struct vr_chain *c, uint32_t len)
{
    vq->ops->push(qp, vq, c, len);
}

static inline void vr_vq_flush(struct vr_qp *qp, struct vr_vq *vq)
{
    vq->ops->flush(qp, vq);
}

static inline void vr_vq_disable_notify(struct vr_qp *qp, struct vr_vq *vq)
{
    vq->ops->disable_notify(qp, vq);
}

static inline bool vr_vq_enable_notify(struct vr_qp *qp, struct vr_vq *vq)
{
    return vq->ops->enable_notify(qp, vq);
}

/* net_tx.c: true if the burst limit stopped it (more work may be pending). */
bool vr_tx_process(struct vr_qp *qp);

/* capture.c: appends a frame (iov minus its first `skip` bytes, `len` bytes) to
 * qp->capture, which the caller has checked is set. */
void vr_capture_frame(struct vr_qp *qp, uint32_t dir, const struct iovec *iov, unsigned niov, size_t skip,
                      uint32_t len);

/* net_rx.c */
/* Forgets the chains RX has popped but not used (the stash) without touching
 * guest memory; their positions are given back to the vq. After a fault (the
 * vq is broken), a reset or a new base: a stale stash would point into memory
 * a later frontend no longer owns. */
void vr_rx_stash_forget(struct vr_qp *qp);
enum vr_rx_state {
    VR_RX_OFF,          /* ring not ready/enabled: do not read the TAP */
    VR_RX_MORE,         /* burst limit hit: come back soon */
    VR_RX_TAP_EMPTY,    /* TAP drained, guest buffers left: wait for the TAP */
    VR_RX_RING_EMPTY,   /* no guest buffers: notifications enabled, wait for a kick */
    VR_RX_TAP_DEAD,     /* TAP hung up: stop watching it until resume */
};
enum vr_rx_state vr_rx_process(struct vr_qp *qp);

/* worker.c: the worker thread, and what vr_qp_new() (qp_control.c) needs to start it */
extern pthread_once_t vr_signals_once;  /* vr_install_signals(), once per process */
void vr_install_signals(void);          /* SIGBUS recovery and the nudge, see worker.c */
void *vr_worker(void *arg);             /* pthread_create() start routine, arg: the qp */

/*
 * The nudge: a signal the control plane sends a worker that does not park in
 * time (vr_qp_pause). Its handler does nothing and is installed without
 * SA_RESTART, so the only effect is that a sleeping syscall of the worker
 * returns EINTR: epoll_wait and io_uring_enter simply retry, an eventfd access
 * the frontend made blocking fails (vr_efd_signal). A real-time signal nobody
 * else in the process uses; glibc's SIGRTMIN already skips its own.
 */
#define VR_SIG_NUDGE (SIGRTMIN + 6)

#endif /* VR_INTERNAL_H */
