/*
 * vhostd.h — the interface between the Python control plane and the C datapath.
 *
 * Everything between the "cdef-begin" and "cdef-end" markers is read verbatim by
 * vhostd/_build_ffi.py as the cffi cdef, so it must stay plain C declarations
 * (no includes, no macros other than integer #defines, no inline code).
 *
 * Ownership rules:
 *  - Python owns every fd (kick, call, err, TAP) and every mapping; C only uses
 *    the numbers and addresses it is handed.
 *  - A struct vr_qp is one queue pair (RX vq 2n, TX vq 2n+1) served by one worker
 *    thread. Every vr_qp_set_* / vr_qp_*_base / vr_qp_map / vr_qp_reset_vq call
 *    and every change to the struct vr_mem a qp points at happens between
 *    vr_qp_pause() and vr_qp_resume() (the calls return -EBUSY otherwise); the
 *    worker never reads configuration outside its own loop.
 *  - Functions return >= 0 on success or -errno; vhostd/native.py turns that into
 *    exceptions.
 */
#ifndef VHOSTD_H
#define VHOSTD_H

#include <stdint.h>
#include <stddef.h>

/* cdef-begin */

#define VR_MAX_REGIONS 512      /* memory regions per device (CONFIGURE_MEM_SLOTS) */
#define VR_MAX_QUEUE_SIZE 32768 /* virtio spec limit (split: 2^n; packed: any size) */
#define VR_MAX_IOV 1024         /* UIO_MAXIOV: longest chain we hand to readv/writev */

/* Address spaces for vr_translate(). */
#define VR_SPACE_GPA 0          /* guest-physical: descriptor addresses */
#define VR_SPACE_UVA 1          /* frontend virtual: SET_VRING_ADDR addresses */

/* How a queue pair's worker talks to its TAP (vr_qp_new, vr_qp_io_mode). */
#define VR_IO_SYSCALL 0         /* one readv/writev per frame */
#define VR_IO_URING 1           /* TX: a burst of writev requests per io_uring_enter */

/* TX copy threshold (vr_qp_set_tx_copy_max): frames of at most this many bytes,
 * vnet header included, are copied into a bounce buffer and written as one. */
#define VR_TX_COPY_DEFAULT 512
#define VR_TX_COPY_LIMIT 512

#define VR_MAX_BUSY_POLL_US 1000000     /* vr_qp_set_busy_poll() limit: 1 s */

/* vq index inside a queue pair */
#define VR_RX 0
#define VR_TX 1

/* Feature bits the datapath looks at (virtio numbering). */
#define VR_F_CSUM 0
#define VR_F_GUEST_CSUM 1
#define VR_F_MTU 3
#define VR_F_GUEST_TSO4 7
#define VR_F_GUEST_TSO6 8
#define VR_F_GUEST_ECN 9
#define VR_F_GUEST_UFO 10
#define VR_F_HOST_TSO4 11
#define VR_F_HOST_TSO6 12
#define VR_F_HOST_ECN 13
#define VR_F_HOST_UFO 14
#define VR_F_MRG_RXBUF 15
#define VR_F_LOG_ALL 26         /* VHOST_F_LOG_ALL: mark written pages in the dirty log */
#define VR_F_INDIRECT_DESC 28
#define VR_F_EVENT_IDX 29
#define VR_F_VERSION_1 32
#define VR_F_RING_PACKED 34
#define VR_F_IN_ORDER 35
#define VR_F_GUEST_USO4 54
#define VR_F_GUEST_USO6 55
#define VR_F_HOST_USO 56

/* Why a vq stopped being serviced (vr_vq_stats.broken). 0 = healthy. */
#define VR_BROKEN_NONE 0
#define VR_BROKEN_AVAIL_IDX 1    /* avail idx ran more than the queue size ahead */
#define VR_BROKEN_DESC 2         /* descriptor index, loop, length or flags invalid */
#define VR_BROKEN_ADDR 3         /* a buffer lies outside guest memory */
#define VR_BROKEN_INDIRECT 4     /* bad indirect table (size, nesting, NEXT+INDIRECT) */
#define VR_BROKEN_RING_ADDR 5    /* desc/avail/used not inside one mapped region */
#define VR_BROKEN_MEMORY 6       /* guest memory faulted (the frontend shrank its file) */
#define VR_BROKEN_NOTIFY 7       /* a kick or call eventfd blocked the worker (detail: VR_NOTIFY_*) */

/* broken_detail of VR_BROKEN_NOTIFY: which eventfd the frontend made blocking */
#define VR_NOTIFY_KICK 0
#define VR_NOTIFY_CALL 1

/* One guest memory region, as SET_MEM_TABLE describes it plus where we mapped it. */
struct vr_region {
    uint64_t gpa;           /* guest physical address of the first byte */
    uint64_t uva;           /* frontend (QEMU) virtual address of the first byte */
    uint64_t size;          /* bytes */
    uint64_t hva;           /* our address of the first byte (mmap base + mmap_offset) */
};

/* The region table of one device; shared by all its queue pairs. Sorted by gpa
 * (vr_mem_validate checks it): guest-physical lookups are a binary search. */
struct vr_mem {
    uint32_t nregions;
    struct vr_region regions[VR_MAX_REGIONS];
};

/*
 * Per-vq counters. Written only by the worker thread (plain u64 stores, no locks);
 * the control plane reads them racily, which is fine for aligned u64 on our targets.
 */
struct vr_vq_stats {
    uint64_t packets;           /* frames moved (TX: written to TAP; RX: given to guest) */
    uint64_t bytes;             /* frame bytes, vnet header excluded */
    uint64_t drop_ring_full;    /* RX: frame read but no/too small guest buffer */
    uint64_t drop_tap_busy;     /* TX: TAP write returned EAGAIN/ENOBUFS */
    uint64_t drop_tap_error;    /* TX: TAP write failed otherwise (EINVAL, EIO, ...) */
    uint64_t drop_bad_desc;     /* chain rejected (see broken) */
    uint64_t drop_bad_hdr;      /* TX: vnet header refused */
    uint64_t drop_disabled;     /* TX: ring started but disabled: consumed and dropped */
    uint64_t kicks;             /* kick eventfd reads that found a kick */
    uint64_t calls;             /* call eventfd writes */
    uint64_t calls_suppressed;  /* calls skipped because the guest asked us not to */
    uint64_t batch_hist[8];     /* chains per burst: 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64-127, 128+ */
    uint64_t batch_sum;         /* chains over all bursts counted in batch_hist (the histogram's sum) */
    uint32_t broken;            /* VR_BROKEN_*; nonzero: ring no longer serviced */
    uint32_t broken_detail;     /* descriptor index or similar, for the log line */
};

struct vr_qp;                   /* opaque: one queue pair + its worker thread */

/* --- guest memory (guest_mem.c) --- */

/* mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0). *addr gets the base. */
int vr_mmap(int fd, uint64_t len, uint64_t *addr);
int vr_munmap(uint64_t addr, uint64_t len);

/* The f_type fstatfs(2) reports for fd's file system (TMPFS_MAGIC, HUGETLBFS_MAGIC, ...). */
int vr_fd_fs_type(int fd, uint64_t *type);

/*
 * The one translation function (exported copy of the inline one the datapath uses):
 * host pointer for `addr` in `space`, or NULL if unmapped. On success *len is
 * clamped to the bytes that are contiguous in that region (so callers loop to
 * cover a range that spans regions). Overflow-safe for any addr and *len.
 */
void *vr_translate(const struct vr_mem *mem, int space, uint64_t addr, uint64_t *len);

/* Checks a table: regions non-empty, sorted by gpa, no gpa/uva/hva overflow, no gpa
 * overlap. 0 or -EINVAL. */
int vr_mem_validate(const struct vr_mem *mem);

/* --- queue pair and worker (qp_control.c; the worker thread: worker.c) --- */

/*
 * Creates a queue pair bound to `mem` (which must outlive it) and `tap_fd`
 * (non-blocking, IFF_VNET_HDR), and starts its worker thread, idle until both
 * rings are ready. io_mode VR_IO_URING: TX bursts through io_uring where
 * io_uring_setup() works (else one syscall per frame, the reason kept for
 * vr_qp_io_error); VR_IO_SYSCALL: one readv/writev per frame. NULL on failure
 * (errno set).
 */
struct vr_qp *vr_qp_new(struct vr_mem *mem, int tap_fd, int io_mode);

/* Parks, stops and joins the worker, frees the qp. Closes no fd. -EBUSY, and
 * nothing freed, for a stuck worker that has not parked (see vr_qp_pause): the
 * caller keeps the qp, its memory and its fds until vr_qp_parked(), then frees
 * it again. */
int vr_qp_free(struct vr_qp *qp);

/*
 * Synchronous: returns once the worker is parked outside the datapath. Nests: each
 * pause needs one resume. A worker that does not park at once is nudged
 * (VR_SIG_NUDGE, which ends a sleep in an eventfd the frontend made blocking);
 * one that still has not parked when the pause timeout (default 5 s) expires is
 * marked stuck: -ETIMEDOUT, now and for every later pause, and the pause request
 * stays pending, so that the worker parks for good if it ever returns. A stuck
 * queue pair must not be freed, nor its memory unmapped, before vr_qp_parked()
 * says it has parked.
 */
int vr_qp_pause(struct vr_qp *qp);
int vr_qp_resume(struct vr_qp *qp);

/* 1 if the worker is parked now (a stuck one that came back), else 0. */
int vr_qp_parked(struct vr_qp *qp);

/*
 * Negotiated virtio features (VR_F_* bits) and the vnet header length (10 or 12;
 * 12 required with MRG_RXBUF). RING_PACKED selects the packed ring for both vqs;
 * changing the ring kind restarts both vqs' ring state (call before SET_VRING_BASE,
 * as frontends do). The offloads acked here decide which vnet headers TX accepts and
 * how many RX buffers a mergeable frame may need.
 */
int vr_qp_set_features(struct vr_qp *qp, uint64_t features, uint32_t vnet_hdr_len);

/*
 * The device MTU (VIRTIO_NET_F_MTU / NET_SET_MTU / the TAP's MTU), 68..65535,
 * default 1500. With MRG_RXBUF and no GUEST_TSO4/TSO6/UFO/USO4/USO6 acked, RX
 * gathers buffers for mtu + 18 (Ethernet + VLAN) + header bytes per frame; with
 * any of them, 65550 + header. Paused only.
 */
int vr_qp_set_mtu(struct vr_qp *qp, uint32_t mtu);

/* Ring configuration for vq `which` (VR_RX / VR_TX). Paused only. set_num and
 * set_addr drop the current ring mapping: call vr_qp_map afterwards. */
int vr_qp_set_num(struct vr_qp *qp, int which, uint32_t num);           /* -EINVAL: 0, > max, split and not 2^n */
int vr_qp_set_addr(struct vr_qp *qp, int which, uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva);
/*
 * SET/GET_VRING_BASE. Split: base = next avail index (bits 0-15; used restarts
 * there). Packed (vhost-user spec): bits 0-14 next avail slot, bit 15 avail wrap
 * counter, bits 16-30 next used slot, bit 31 used wrap counter; slots must be
 * < num. A packed base with bits 16-31 zero (DPDK 22.11 style) sets used = avail.
 * GET always reports both halves (they are equal: nothing is in flight while parked).
 */
int vr_qp_set_base(struct vr_qp *qp, int which, uint32_t base);
int vr_qp_get_base(struct vr_qp *qp, int which, uint32_t *base);
int vr_qp_set_kick(struct vr_qp *qp, int which, int fd);   /* -1: none. Stops watching the old fd now. */
int vr_qp_set_call(struct vr_qp *qp, int which, int fd);   /* -1: none */
int vr_qp_set_err(struct vr_qp *qp, int which, int fd);    /* -1: none; written once when the vq breaks */
int vr_qp_set_started(struct vr_qp *qp, int which, int started);
int vr_qp_set_enabled(struct vr_qp *qp, int which, int enabled);

/*
 * (Re)translates the ring addresses of both vqs through the current memory table.
 * Call after SET_VRING_ADDR or after the table changed. A vq whose rings are set
 * but not inside guest memory gets -EFAULT and is not serviced until the next
 * successful call. Paused only.
 */
int vr_qp_map(struct vr_qp *qp);

/*
 * Dirty-page log (vhost-user spec "Migration", SET_LOG_BASE): `log` is the host
 * address of the frontend's bitmap as the control plane mapped it, `words` its
 * size in u64 words (bit p % 64 of word p / 64 stands for the 4 KiB guest-
 * physical page p). While a log is set and the features include VR_F_LOG_ALL,
 * the worker marks every guest page it writes: RX buffer bytes, used-ring /
 * descriptor write-backs and event fields. Marks beyond `words` are dropped and
 * counted. log 0: none. Paused only (a new log replaces the old one between
 * bursts, and a parked worker holds no unlogged write).
 */
int vr_qp_set_log(struct vr_qp *qp, uint64_t log, uint64_t words);

/* SET_VRING_ADDR's VHOST_VRING_F_LOG: the split used ring's writes are logged
 * at guest-physical log_guest_addr (log 0: at the address translated from the
 * ring's own, which is also what packed rings use). Paused only. */
int vr_qp_set_log_addr(struct vr_qp *qp, int which, int log, uint64_t log_guest_addr);

/* Pages whose bit this queue pair turned on in the dirty log, and marks dropped
 * because they fell beyond its end, since the qp was created. Readable any time. */
uint64_t vr_qp_log_marks(struct vr_qp *qp);
uint64_t vr_qp_log_overflow(struct vr_qp *qp);

/*
 * Ring positions a worker publishes after every burst that moved them, into
 * memory the control plane keeps in a file on tmpfs, for a vhostd restarted
 * after a crash (a packed ring's frontend resends only the position of its last
 * clean stop). seq is odd while the worker writes and even after: an odd seq
 * read after a crash means the positions are torn. Positions as
 * SET/GET_VRING_BASE halves: split free-running index, packed slot | wrap << 15.
 *
 * A packed ring also stores, in one 32-bit store before the flag that publishes
 * a batch of used descriptors, the batch's first position (low half) and the used
 * position after the batch (high half). A daemon killed between that flag and the
 * next publish leaves `used` one batch behind what the driver already took; the
 * next daemon reads the flag at the batch's first slot: still the driver's
 * available descriptor of that lap means the batch was never published (resume
 * at its first position), anything else that it was (resume after it).
 */
struct vr_vq_saved {
    uint64_t seq;
    uint16_t avail;
    uint16_t used;
    uint32_t batch;     /* packed: first slot | used position after, see below */
};

/* Where vq `which` publishes its positions (NULL: nowhere). Paused only. */
int vr_qp_set_saved(struct vr_qp *qp, int which, struct vr_vq_saved *saved);

/* Counters of vq `which`; valid for the qp's lifetime. Readable any time. */
const struct vr_vq_stats *vr_qp_stats(struct vr_qp *qp, int which);

/* 1 if vq `which` has its rings mapped (by the last vr_qp_map), else 0. Paused only. */
int vr_qp_mapped(struct vr_qp *qp, int which);

/* Back to the state of a new qp for vq `which`: no rings, no fds (the kick fd is
 * unwatched at once), not started or enabled, counters and broken state zeroed.
 * Paused only. */
int vr_qp_reset_vq(struct vr_qp *qp, int which);

/*
 * An eventfd the worker writes when something the control plane should log
 * happened (a vq broke). Owned by the qp; Python only watches it and reads it.
 */
int vr_qp_event_fd(struct vr_qp *qp);

/* --- TAP I/O, busy polling, CPU placement, diagnostics (qp_control.c) --- */

/*
 * TX copy threshold: frames whose vnet header + packet total at most `bytes` are
 * copied into a per-slot bounce buffer and written as one buffer (write /
 * IORING_OP_WRITE); larger ones go zero-copy by writev. 0 disables the copy.
 * Default VR_TX_COPY_DEFAULT; at most VR_TX_COPY_LIMIT, else -EINVAL. Paused only.
 */
int vr_qp_set_tx_copy_max(struct vr_qp *qp, uint32_t bytes);

/* Frames this queue pair's TX sent through its bounce buffers (valid header,
 * handed to the TAP), since it was created. Read while paused. */
uint64_t vr_qp_tx_copied(struct vr_qp *qp);

/*
 * The device side of vq `which` and its worker, for diagnostics (vhostctl rings):
 * readable any time, without pausing, so a snapshot of a running ring can be a
 * burst stale and its fields mutually inconsistent. Positions are split: the
 * free-running 16-bit index; packed: slot | wrap counter << 15.
 */
struct vr_vq_state {
    uint16_t last_avail;        /* next avail position the device will look at */
    uint16_t used;              /* next used position the device will write */
    uint16_t published_used;    /* split: last value stored to used->idx */
    uint16_t signalled_used;    /* split: used idx at the last call decision (EVENT_IDX) */
    uint16_t device_event_flags;/* packed: what the device last wrote to its event flags */
    uint8_t signalled_valid;    /* split: signalled_used means something */
    uint8_t ready;              /* serviced: size, rings mapped, started, not broken */
    uint8_t kick_watched;       /* the worker's epoll watches the kick fd */
    uint8_t tap_watched;        /* the worker's epoll watches the TAP (RX wants frames) */
    uint8_t tap_dead;           /* the TAP hung up; unwatched until the next resume */
    uint64_t idle_waits;        /* vr_qp_idle_waits() */
};
int vr_qp_vq_state(struct vr_qp *qp, int which, struct vr_vq_state *out);

/* How many times the worker went to sleep with nothing left to do (an epoll
 * wait without timeout). Read while paused, resume, then wait for it to grow:
 * the worker has finished the pass that resume starts. */
uint64_t vr_qp_idle_waits(struct vr_qp *qp);

/* VR_IO_SYSCALL or VR_IO_URING: fixed when vr_qp_new() returns (a ring that
 * fails later falls back to VR_IO_SYSCALL). */
int vr_qp_io_mode(struct vr_qp *qp);

/* The errno io_uring set-up failed with (ENOSYS, EPERM, ...), 0 if it was not
 * tried (VR_IO_SYSCALL) or worked. */
int vr_qp_io_error(struct vr_qp *qp);

/*
 * Busy poll window in microseconds (0..VR_MAX_BUSY_POLL_US, 0 = off, the
 * default): after a burst that moved frames the worker keeps polling its rings
 * and TAP for this long before it sleeps in epoll again. Paused only.
 */
int vr_qp_set_busy_poll(struct vr_qp *qp, uint32_t usecs);

/* Pins the worker thread to one CPU; -1 undoes it. -EINVAL for a CPU that is
 * not available to the process, -EPERM under a sandbox that forbids it. */
int vr_qp_set_cpu(struct vr_qp *qp, int cpu);

/* --- packet capture (capture.c) --- */

#define VR_CAP_RX 1             /* TAP -> guest frames */
#define VR_CAP_TX 2             /* guest -> TAP frames */

/* One captured frame in a capture ring, followed by caplen bytes of the Ethernet
 * frame (no vnet header) and padding to a multiple of 8 (len covers it all). */
struct vr_cap_rec {
    uint32_t len;               /* bytes of this record, header and padding included */
    uint32_t caplen;            /* frame bytes kept (at most the snap length) */
    uint32_t origlen;           /* frame length on the wire */
    uint8_t dir;                /* VR_CAP_RX or VR_CAP_TX */
    uint8_t queue;              /* queue pair */
    uint16_t pad;
    uint64_t ts_ns;             /* CLOCK_REALTIME when the datapath took it */
};

struct vr_capture;              /* opaque: one queue pair's capture ring */

/* A capture ring of `bytes` (a power of two, 4 KiB .. 1 GiB) keeping at most
 * `snaplen` bytes per frame of the directions in `dirs`, for queue pair `queue`.
 * NULL (errno EINVAL/ENOMEM) on bad arguments. */
struct vr_capture *vr_capture_new(uint32_t bytes, uint32_t snaplen, uint32_t dirs, uint32_t queue);
void vr_capture_free(struct vr_capture *c);     /* detach it from its qp first */

/* Attaches a capture ring to the worker (NULL detaches). Paused only. While
 * attached the worker appends every frame it moves; a frame that does not fit
 * is dropped from the capture and counted, never waited for. */
int vr_qp_set_capture(struct vr_qp *qp, struct vr_capture *c);

/* Consumer: moves whole records (at most `len` bytes) into buf; bytes moved. Any
 * thread, one at a time per ring, concurrently with the worker. */
long vr_capture_read(struct vr_capture *c, uint8_t *buf, uint64_t len);
uint64_t vr_capture_frames(const struct vr_capture *c);     /* records written */
uint64_t vr_capture_drops(const struct vr_capture *c);      /* frames that did not fit */

/* --- test-only entry points (tests and fuzzers; the daemon never calls these) --- */

/* The pause timeout of vr_qp_pause() for every queue pair, in ms (default 5000). */
void vr_set_pause_timeout(unsigned ms);

/* Makes the worker spin for `ms` milliseconds, deaf to nudges, at the start of
 * its next pass: a worker that will not park. Callable any time. */
int vr_qp_test_stall(struct vr_qp *qp, unsigned ms);

/* One round of bursts (TX then RX) on the calling thread, exactly as the worker
 * runs them, SIGBUS recovery included. Paused only. Bit 0: TX has more work,
 * bit 1: RX has. */
int vr_qp_test_burst(struct vr_qp *qp);

/* What the worker holds between bursts that it must never hold while parked:
 * RX chains popped but not used (the stash) plus TX requests prepared for
 * io_uring but not submitted. 0 for a healthy parked queue pair. Paused only. */
int vr_qp_inflight(struct vr_qp *qp);

/* cdef-end */

#endif /* VHOSTD_H */
