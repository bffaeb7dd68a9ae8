"""Build of walrus._uring._liburing (cffi, API mode) and the PEP 517 backend that compiles it on install."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import sysconfig


def _bind_pypa_packaging() -> None:
    """Imports PyPA's `packaging` from the build environment before setuptools asks for it.

    pip and `build` load an in-tree backend through a meta-path finder that resolves every top-level
    import against backend-path (the project root) first; there the project's own packaging/
    directory (distro packaging files, no __init__.py) would pass for a namespace package and hide
    PyPA's library from setuptools.
    """
    if "packaging" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("packaging", sys.path)
    if spec is None or not spec.has_location:  # not found, or only our namespace directory
        raise SystemExit("walrus: the build environment lacks the `packaging` library")
    module = importlib.util.module_from_spec(spec)
    sys.modules["packaging"] = module
    spec.loader.exec_module(module)


_bind_pypa_packaging()

import cffi  # noqa: E402  (after _bind_pypa_packaging)
from setuptools import build_meta as _setuptools_backend  # noqa: E402

SCRIPT = "build_uring.py"
MODULE = "walrus._uring._liburing"
HEADER = "liburing.h"

# API mode (set_source) rather than ABI mode: liburing's io_uring_prep_* helpers, io_uring_get_sqe and
# io_uring_cq_advance are static inline in the header, so only a compiled module can call them.
CDEF = """
typedef int... __s32;
typedef int... __u64;

struct io_uring { int ring_fd; ...; };  /* ring_fd: for tests that break a ring */
struct io_uring_sqe { __u64 user_data; ...; };
struct io_uring_cqe { __u64 user_data; __s32 res; ...; };
struct io_uring_probe { ...; };
struct iovec { void *iov_base; size_t iov_len; };

static const int IORING_OP_READ;
static const int IORING_OP_READ_FIXED;
static const int IORING_OP_WRITE;
static const int IORING_OP_WRITE_FIXED;

int io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
void io_uring_queue_exit(struct io_uring *ring);
struct io_uring_probe *io_uring_get_probe_ring(struct io_uring *ring);
void io_uring_free_probe(struct io_uring_probe *probe);
int io_uring_opcode_supported(const struct io_uring_probe *p, int op);

int io_uring_register_buffers(struct io_uring *ring, const struct iovec *iovecs, unsigned nr_iovecs);
int io_uring_unregister_buffers(struct io_uring *ring);

struct io_uring_sqe *io_uring_get_sqe(struct io_uring *ring);
void io_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, __u64 offset);
void io_uring_prep_read_fixed(struct io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, __u64 offset,
                              int buf_index);
void io_uring_prep_write(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes, __u64 offset);
void io_uring_prep_write_fixed(struct io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                               __u64 offset, int buf_index);
int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
struct __kernel_timespec { long long tv_sec; long long tv_nsec; };
typedef struct { ...; } sigset_t;
int io_uring_submit_and_wait_timeout(struct io_uring *ring, struct io_uring_cqe **cqe_ptr, unsigned wait_nr,
                                     struct __kernel_timespec *ts, sigset_t *sigmask);
unsigned io_uring_peek_batch_cqe(struct io_uring *ring, struct io_uring_cqe **cqes, unsigned count);
void io_uring_cq_advance(struct io_uring *ring, unsigned nr);

long walrus_select_pages(const unsigned char *pages, size_t count, unsigned page_size, uint64_t lsn,
                         uint32_t first_block, uint32_t *out, size_t *selected);
size_t walrus_check_pages(const unsigned char *pages, size_t count, uint32_t first_block, uint64_t lsn,
                          int checksums, uint32_t *bad);

struct walrus_walmap {
    uint64_t pos; int status; int error; uint64_t error_lsn; uint64_t records; int switched;
    uint32_t need; uint32_t rec_len; uint32_t got; uint64_t rec_lsn; int foreign; int decoded;
    uint32_t cont_len; uint32_t cont_got; unsigned char head[4096]; unsigned char cont[4096];
    uint32_t *refs; size_t nrefs; uint16_t magic;
    ...;
};
void walrus_walmap_init(struct walrus_walmap *st, uint64_t seg_start, uint32_t seg_size, uint64_t stop_lsn);
int walrus_walmap_feed(struct walrus_walmap *st, const unsigned char *data, size_t len);
int walrus_walmap_record(struct walrus_walmap *st, const unsigned char *data, size_t len, uint32_t rec_len,
                         uint16_t magic);
int walrus_walmap_finish(struct walrus_walmap *st);
void walrus_walmap_release(struct walrus_walmap *st);
size_t walrus_walmap_merge(const uint32_t *a, size_t na, const uint32_t *b, size_t nb, uint32_t *out);
int walrus_walmap_sorted(const uint32_t *refs, size_t n);
size_t walrus_walmap_unique(uint32_t *refs, size_t n);
size_t walrus_walmap_group_end(const uint32_t *refs, size_t n, size_t i, uint32_t relseg);
void walrus_walmap_set_bits(uint8_t *bits, const uint32_t *refs, size_t i, size_t j, uint32_t first);
size_t walrus_walmap_list_bits(const uint8_t *bits, size_t nbits, uint32_t *out);
size_t walrus_walmap_count_bits(const uint8_t *bits, size_t nbytes);

struct walrus_rreq { int32_t fd; char *addr; uint64_t offset; uint64_t len; ...; };
struct walrus_rbatch {
    struct walrus_rreq *reqs; uint64_t *done; uint32_t n; uint64_t id; int32_t error; uint32_t failed; ...;
};
struct walrus_reads {
    uint64_t completions; uint64_t fixed_reads; uint32_t inflight; uint64_t inflight_bytes;
    uint32_t peak_reads; uint64_t peak_bytes; uint32_t pending; uint32_t finished;
    uint32_t max_chunk; uint64_t fault_cqe; int32_t fault_res;
    ...;
};
static const int WALRUS_READS_TIMED_OUT;
void walrus_reads_init(struct walrus_reads *r, struct io_uring *ring, unsigned entries, uint64_t cap);
void walrus_reads_fixed(struct walrus_reads *r, char *base, uint64_t size, uint32_t count);
void walrus_reads_add(struct walrus_reads *r, struct walrus_rbatch *b);
int walrus_reads_step(struct walrus_reads *r, int wait, unsigned timeout_ms, uint64_t *out, unsigned room);

struct walrus_copy {
    void *conn; void *get_copy_data; void *consume_input; void *freemem; void *socket;
    char kind; int skip; int check_lsn; uint64_t lsn;
    char *msg; int len; int pos;
    ...;
};
static const int WALRUS_COPY_FULL;
static const int WALRUS_COPY_EVENT;
static const int WALRUS_COPY_END;
static const int WALRUS_COPY_ERROR;
static const int WALRUS_COPY_WAIT;
size_t walrus_copy_fill(struct walrus_copy *c, char *dst, size_t cap, int timeout_ms, int *status);
void walrus_copy_drop(struct walrus_copy *c);

size_t walrus_ss_push(uintptr_t push, uintptr_t state, unsigned char *dst, const unsigned char *src, size_t n,
                      size_t chunk, unsigned char tag);
long walrus_ss_pull(uintptr_t pull, uintptr_t state, unsigned char *dst, const unsigned char *src, size_t n,
                    size_t chunk, unsigned char *tag);
"""

# Delta backups' page scan (walrus.pg.pages), here so a buffer the io_uring reader filled is scanned
# without a Python step per page. WAL-G's rules (incremental_page_reader.go, postgres_page_header.go):
# a page is selected when it is new (pd_upper 0) or valid with pd_lsn >= lsn; any other page is
# invalid and ends the scan: the return value is its index (the caller copies the file whole), -1
# when all `count` pages were scanned. Pages are in the host's byte order, as PostgreSQL writes them.
PAGES_SOURCE = """
#include <stdint.h>
#include <string.h>

static long walrus_select_pages(const unsigned char *pages, size_t count, unsigned page_size, uint64_t lsn,
                                uint32_t first_block, uint32_t *out, size_t *selected)
{
    size_t n = 0;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *p = pages + i * (size_t)page_size;
        uint32_t xlogid, xrecoff;
        uint16_t flags, lower, upper, special, size_version;
        memcpy(&xlogid, p, 4);
        memcpy(&xrecoff, p + 4, 4);
        memcpy(&flags, p + 10, 2);
        memcpy(&lower, p + 12, 2);
        memcpy(&upper, p + 14, 2);
        memcpy(&special, p + 16, 2);
        memcpy(&size_version, p + 18, 2);
        uint64_t page_lsn = ((uint64_t)xlogid << 32) | xrecoff;
        int valid = (flags & 7) == flags && lower >= 24 && lower <= upper && upper <= special
                    && special <= page_size && page_lsn != 0 && (size_version & 0xFF00) == page_size
                    && (size_version & 0xFF) <= 5;
        if (valid ? page_lsn >= lsn : upper == 0)
            out[n++] = first_block + (uint32_t)i;
        else if (!valid) {
            *selected = n;
            return (long)i;
        }
    }
    *selected = n;
    return -1;
}

/* PostgreSQL's data page checksum (storage/checksum_impl.h: 32 interleaved FNV-1a-like hashes over
   the 8 KiB page with pd_checksum taken as zero, two rounds of zeros, folded by xor, the block
   number mixed in, reduced to 1..65535). Here for backup-push --verify and backup-verify. */
static const uint32_t walrus_checksum_base[32] = {
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756};

#define WALRUS_MIX(sum, value) do { uint32_t t_ = (sum) ^ (value); (sum) = t_ * 16777619u ^ (t_ >> 17); } while (0)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX2 multiplies eight 32-bit lanes at once where the CPU has it, chosen when the module loads */
__attribute__((target_clones("avx2", "default")))
#endif
static uint16_t walrus_page_checksum(const unsigned char *page, uint32_t block)
{
    uint32_t sums[32], word, result = 0;
    unsigned char head[128];
    memcpy(sums, walrus_checksum_base, sizeof sums);
    memcpy(head, page, sizeof head);
    head[8] = head[9] = 0;  /* pd_checksum */
    for (size_t i = 0; i < 8192 / 128; i++) {
        const unsigned char *row = i ? page + i * 128 : head;
        for (size_t j = 0; j < 32; j++) {
            memcpy(&word, row + 4 * j, 4);
            WALRUS_MIX(sums[j], word);
        }
    }
    for (int round = 0; round < 2; round++)
        for (size_t j = 0; j < 32; j++)
            WALRUS_MIX(sums[j], 0);
    for (size_t j = 0; j < 32; j++)
        result ^= sums[j];
    return (uint16_t)(((result ^ block) % 65535) + 1);
}

/* PostgreSQL's verification of a page read from disk (PageIsVerifiedExtended): a new page (pd_upper
   0) must be all zeros; any other must have a sane header and the checksum of its block number.
   Without `checksums` (a cluster without them) the checksum is not compared. A page whose LSN is
   `lsn` or later is not checked (0: every page): recovery replaces it from the WAL, and a backup may
   read it torn by a concurrent write. Writes the block numbers of the pages that fail to `bad`;
   returns how many. */
static size_t walrus_check_pages(const unsigned char *pages, size_t count, uint32_t first_block, uint64_t lsn,
                                 int checksums, uint32_t *bad)
{
    size_t n = 0;
    for (size_t i = 0; i < count; i++) {
        const unsigned char *p = pages + i * (size_t)8192;
        uint16_t checksum, flags, lower, upper, special;
        uint32_t xlogid, xrecoff;
        memcpy(&xlogid, p, 4);
        memcpy(&xrecoff, p + 4, 4);
        if (lsn && (((uint64_t)xlogid << 32) | xrecoff) >= lsn)
            continue;
        memcpy(&checksum, p + 8, 2);
        memcpy(&flags, p + 10, 2);
        memcpy(&lower, p + 12, 2);
        memcpy(&upper, p + 14, 2);
        memcpy(&special, p + 16, 2);
        int ok;
        if (upper == 0) {
            ok = 1;
            for (size_t k = 0; k < 8192 && ok; k++)
                ok = p[k] == 0;
        } else {
            ok = (flags & 7) == flags && lower <= upper && upper <= special && special <= 8192
                 && (special & 7) == 0 && (!checksums || checksum == walrus_page_checksum(p, first_block + (uint32_t)i));
        }
        if (!ok)
            bad[n++] = first_block + (uint32_t)i;
    }
    return n;
}
"""

# The WAL block map (walrus.pg.walmap): which relation blocks a WAL segment's records touch, read
# from the block references of each record's header (PostgreSQL's xlogrecord.h and DecodeXLogRecord,
# versions 13 to 17), fed a segment's bytes in pieces as wal-push reads them. A record's header is
# kept (up to WALMAP_HEAD bytes) until it can be decoded, so one that spans pages or buffers costs
# no copy of its data; one that runs into the next segment leaves its start (the caller's "tail"),
# and the next segment's first bytes (its "cont") complete it. Records that change a relation's file
# without block references (a relation's storage created, a database directory copied) mark the whole
# relation or database: block WALMAP_WHOLE. Output: (tablespace, database, relation, block) of the
# main fork, sorted and unique. Invariant: a block a record touches is in the output, or the parse
# ends with an error (status < 0); extra blocks are harmless.
WALMAP_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WALMAP_PAGE 8192
#define WALMAP_HEAD 4096
#define WALMAP_WHOLE 0xFFFFFFFFu
#define WALMAP_RECORD_HEADER 24
#define WALMAP_MAXALIGN(x) (((x) + 7) & ~(size_t)7)
#define XLP_FIRST_IS_CONTRECORD 0x0001
#define XLP_LONG_HEADER 0x0002

enum { WALMAP_PARSING = 0, WALMAP_DONE = 1 };
enum { WALMAP_E_MAGIC = -1, WALMAP_E_ADDRESS = -2, WALMAP_E_GEOMETRY = -3, WALMAP_E_LENGTH = -4,
       WALMAP_E_HEADER = -5, WALMAP_E_MEMORY = -6, WALMAP_E_TRUNCATED = -7 };

struct walrus_walmap {
    uint64_t pos;             /* bytes of the segment consumed */
    int status;               /* WALMAP_PARSING, WALMAP_DONE, or an error (< 0) */
    int error;
    uint64_t error_lsn;
    uint64_t records;         /* records decoded */
    int switched;             /* the segment ended with an XLOG_SWITCH record */
    uint32_t need;            /* bytes of the record in progress still to come */
    uint32_t rec_len;         /* its xl_tot_len */
    uint32_t got;             /* bytes of it seen */
    uint64_t rec_lsn;
    int foreign;              /* it began in an earlier segment (the bytes go to cont) */
    int decoded;
    uint32_t cont_len;        /* xlp_rem_len of the segment's first page */
    uint32_t cont_got;
    unsigned char head[WALMAP_HEAD];
    unsigned char cont[WALMAP_HEAD];
    uint32_t *refs;           /* four uint32 per block */
    size_t nrefs, cap;
    uint64_t seg_start, stop_lsn;
    uint32_t seg_size, fill;
    uint16_t magic;
    uint8_t compressed_mask;  /* BKPIMAGE_* bits that mean "compressed": they moved in version 15 */
    unsigned char page[WALMAP_PAGE];
};

static uint16_t wm_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t wm_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t wm_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int wm_cmp(const void *a, const void *b)
{
    const uint32_t *x = a, *y = b;
    for (int i = 0; i < 4; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

static size_t wm_unique(uint32_t *refs, size_t n)
{
    if (n == 0)
        return 0;
    qsort(refs, n, 16, wm_cmp);
    size_t k = 1;
    for (size_t i = 1; i < n; i++)
        if (memcmp(refs + 4 * i, refs + 4 * (k - 1), 16) != 0)
            memmove(refs + 4 * k++, refs + 4 * i, 16);
    return k;
}

static void wm_fail(struct walrus_walmap *st, int error, uint64_t lsn)
{
    if (st->status >= 0) {
        st->status = error;
        st->error = error;
        st->error_lsn = lsn;
    }
}

static void wm_emit(struct walrus_walmap *st, uint32_t spc, uint32_t db, uint32_t rel, uint32_t blk)
{
    if (st->nrefs == st->cap) {
        st->nrefs = wm_unique(st->refs, st->nrefs);  /* most references repeat: compact before growing */
        if (st->nrefs * 2 >= st->cap) {
            size_t cap = st->cap ? st->cap * 2 : 4096;
            uint32_t *grown = realloc(st->refs, cap * 16);
            if (grown == NULL) {
                wm_fail(st, WALMAP_E_MEMORY, st->rec_lsn);
                return;
            }
            st->refs = grown;
            st->cap = cap;
        }
    }
    uint32_t *r = st->refs + 4 * st->nrefs++;
    r[0] = spc; r[1] = db; r[2] = rel; r[3] = blk;
}

/* The block references of the record in head[0..avail): 1 decoded, 0 more bytes needed, < 0 an
   error. complete: the whole record is there, so its main data can be read too. */
static int wm_decode(struct walrus_walmap *st, size_t avail, int complete)
{
    const unsigned char *r = st->head;
    if (avail < WALMAP_RECORD_HEADER)
        return complete ? WALMAP_E_HEADER : 0;
    size_t ptr = WALMAP_RECORD_HEADER, remaining = st->rec_len - WALMAP_RECORD_HEADER, datatotal = 0;
    uint32_t spc = 0, db = 0, rel = 0, main_len = 0;
    int have_rel = 0;
#define WM_NEED(k) do { if ((k) > remaining) return WALMAP_E_HEADER; \
                        if (ptr + (k) > avail) return complete ? WALMAP_E_HEADER : 0; } while (0)
#define WM_TAKE(k) do { ptr += (k); remaining -= (k); } while (0)
    while (remaining > datatotal) {
        WM_NEED(1);
        uint8_t id = r[ptr];
        WM_TAKE(1);
        if (id == 255) {            /* XLR_BLOCK_ID_DATA_SHORT */
            WM_NEED(1); main_len = r[ptr]; WM_TAKE(1);
            break;
        } else if (id == 254) {     /* XLR_BLOCK_ID_DATA_LONG */
            WM_NEED(4); main_len = wm_u32(r + ptr); WM_TAKE(4);
            break;
        } else if (id == 253) {     /* XLR_BLOCK_ID_ORIGIN */
            WM_NEED(2); WM_TAKE(2);
        } else if (id == 252) {     /* XLR_BLOCK_ID_TOPLEVEL_XID */
            WM_NEED(4); WM_TAKE(4);
        } else if (id <= 32) {      /* XLR_MAX_BLOCK_ID */
            WM_NEED(3);
            uint8_t fork_flags = r[ptr];
            datatotal += wm_u16(r + ptr + 1);
            WM_TAKE(3);
            if (fork_flags & 0x10) {            /* BKPBLOCK_HAS_IMAGE */
                WM_NEED(5);
                datatotal += wm_u16(r + ptr);
                uint8_t bimg_info = r[ptr + 4];
                WM_TAKE(5);
                if ((bimg_info & st->compressed_mask) && (bimg_info & 0x01)) {  /* BKPIMAGE_HAS_HOLE */
                    WM_NEED(2); WM_TAKE(2);
                }
            }
            if (!(fork_flags & 0x80)) {         /* not BKPBLOCK_SAME_REL */
                WM_NEED(12);
                spc = wm_u32(r + ptr); db = wm_u32(r + ptr + 4); rel = wm_u32(r + ptr + 8);
                have_rel = 1;
                WM_TAKE(12);
            } else if (!have_rel)
                return WALMAP_E_HEADER;
            WM_NEED(4);
            uint32_t blk = wm_u32(r + ptr);
            WM_TAKE(4);
            if ((fork_flags & 0x0F) == 0)       /* MAIN_FORKNUM */
                wm_emit(st, spc, db, rel, blk);
        } else
            return WALMAP_E_HEADER;
    }
#undef WM_NEED
#undef WM_TAKE
    if (datatotal + main_len != remaining)   /* the lengths must add up to the record's, as PostgreSQL checks */
        return WALMAP_E_HEADER;
    uint8_t rmid = r[17], kind = r[16] & 0xF0;
    int smgr_create = rmid == 2 && kind == 0x10, dbase_copy = rmid == 4 && kind == 0x00;
    if (smgr_create || dbase_copy) {
        /* the main data, last in the record, says what changed: these records are small */
        if (!complete || st->rec_len > WALMAP_HEAD)
            return complete || st->rec_len > WALMAP_HEAD ? WALMAP_E_HEADER : 0;
        const unsigned char *m = r + st->rec_len - main_len;
        if (main_len < (smgr_create ? 16u : 8u))
            return WALMAP_E_HEADER;
        if (smgr_create && wm_u32(m + 12) == 0)  /* xl_smgr_create {spc, db, rel, fork}, MAIN_FORKNUM */
            wm_emit(st, wm_u32(m), wm_u32(m + 4), wm_u32(m + 8), WALMAP_WHOLE);
        else if (dbase_copy)                     /* xl_dbase_create_file_copy_rec {db, spc, ...} */
            wm_emit(st, wm_u32(m + 4), wm_u32(m), 0, WALMAP_WHOLE);
    }
    return 1;
}

static void wm_take(struct walrus_walmap *st, const unsigned char *src, uint32_t n)
{
    if (st->foreign) {
        if (st->cont_got < WALMAP_HEAD) {
            uint32_t k = n < WALMAP_HEAD - st->cont_got ? n : WALMAP_HEAD - st->cont_got;
            memcpy(st->cont + st->cont_got, src, k);
            st->cont_got += k;
        }
        return;
    }
    if (st->got < WALMAP_HEAD) {
        uint32_t k = n < WALMAP_HEAD - st->got ? n : WALMAP_HEAD - st->got;
        memcpy(st->head + st->got, src, k);
    }
    st->got += n;
    int complete = st->got == st->rec_len;
    if (!st->decoded && (complete || st->got >= WALMAP_HEAD)) {
        int done = wm_decode(st, st->got < WALMAP_HEAD ? st->got : WALMAP_HEAD, complete);
        if (done < 0 || (done == 0 && st->got >= WALMAP_HEAD))
            wm_fail(st, done < 0 ? done : WALMAP_E_HEADER, st->rec_lsn);
        st->decoded = done == 1;
    }
    if (complete && st->decoded) {
        st->records++;
        if (st->head[17] == 0 && (st->head[16] & 0xF0) == 0x40) {  /* XLOG_SWITCH: the rest is unused */
            st->switched = 1;
            st->status = WALMAP_DONE;
        }
    }
}

static void wm_page(struct walrus_walmap *st, const unsigned char *p)
{
    uint64_t addr = st->seg_start + st->pos;
    int first = st->pos == 0;
    st->pos += WALMAP_PAGE;
    uint16_t magic = wm_u16(p), info = wm_u16(p + 2);
    if (first) {
        if (magic < 0xD106 || magic > 0xD118) {   /* XLOG_PAGE_MAGIC of versions 13 to 17 */
            wm_fail(st, WALMAP_E_MAGIC, addr);
            return;
        }
        st->magic = magic;
        st->compressed_mask = magic >= 0xD110 ? 0x1C : 0x02;
        if (!(info & XLP_LONG_HEADER) || wm_u32(p + 32) != st->seg_size || wm_u32(p + 36) != WALMAP_PAGE) {
            wm_fail(st, WALMAP_E_GEOMETRY, addr);
            return;
        }
    }
    if (magic != st->magic || wm_u64(p + 8) != addr) {
        /* not this segment's WAL: the end of what was written (a file PostgreSQL is still writing or
           recycled), or damage */
        if (first || st->need)
            wm_fail(st, first ? WALMAP_E_ADDRESS : WALMAP_E_TRUNCATED, addr);
        else
            st->status = WALMAP_DONE;
        return;
    }
    size_t off = (info & XLP_LONG_HEADER) ? 40 : 24;
    if (first && (info & XLP_FIRST_IS_CONTRECORD)) {
        st->cont_len = wm_u32(p + 16);
        st->need = st->cont_len;
        st->foreign = 1;
    }
    if (st->need) {
        if (!(info & XLP_FIRST_IS_CONTRECORD) || wm_u32(p + 16) != st->need) {
            /* the record was abandoned (a crash; XLP_FIRST_IS_OVERWRITE_CONTRECORD): what it
               referenced is in the output already, which is harmless */
            st->need = 0;
            st->foreign = 0;
        } else {
            uint32_t n = st->need < WALMAP_PAGE - off ? st->need : (uint32_t)(WALMAP_PAGE - off);
            wm_take(st, p + off, n);
            st->need -= n;
            off += n;
            if (st->need)
                return;
            st->foreign = 0;
            off = WALMAP_MAXALIGN(off);
        }
    }
    while (st->status == WALMAP_PARSING && off < WALMAP_PAGE) {
        uint64_t lsn = addr + off;
        if (st->stop_lsn && lsn >= st->stop_lsn) {
            st->status = WALMAP_DONE;
            return;
        }
        uint32_t len = wm_u32(p + off);
        if (len == 0) {          /* unused space: nothing more was written */
            st->status = WALMAP_DONE;
            return;
        }
        if (len < WALMAP_RECORD_HEADER) {
            wm_fail(st, WALMAP_E_LENGTH, lsn);
            return;
        }
        st->rec_len = len;
        st->rec_lsn = lsn;
        st->got = 0;
        st->decoded = 0;
        uint32_t n = len < WALMAP_PAGE - off ? len : (uint32_t)(WALMAP_PAGE - off);
        wm_take(st, p + off, n);
        off += n;
        st->need = len - n;
        if (st->need)
            return;
        off = WALMAP_MAXALIGN(off);
    }
}

void walrus_walmap_init(struct walrus_walmap *st, uint64_t seg_start, uint32_t seg_size, uint64_t stop_lsn)
{
    memset(st, 0, sizeof *st);
    st->seg_start = seg_start;
    st->seg_size = seg_size;
    st->stop_lsn = stop_lsn;
}

int walrus_walmap_feed(struct walrus_walmap *st, const unsigned char *data, size_t len)
{
    while (len && st->status == WALMAP_PARSING && st->pos < st->seg_size) {
        if (st->fill == 0 && len >= WALMAP_PAGE) {
            wm_page(st, data);
            data += WALMAP_PAGE;
            len -= WALMAP_PAGE;
            continue;
        }
        size_t k = WALMAP_PAGE - st->fill < len ? WALMAP_PAGE - st->fill : len;
        memcpy(st->page + st->fill, data, k);
        st->fill += k;
        data += k;
        len -= k;
        if (st->fill == WALMAP_PAGE) {
            st->fill = 0;
            wm_page(st, st->page);
        }
    }
    return st->status;
}

/* One record's first bytes, given whole (the tail of one segment and the cont of the next). */
int walrus_walmap_record(struct walrus_walmap *st, const unsigned char *data, size_t len, uint32_t rec_len,
                         uint16_t magic)
{
    memset(st, 0, sizeof *st);
    st->compressed_mask = magic >= 0xD110 ? 0x1C : 0x02;
    if (rec_len < WALMAP_RECORD_HEADER || len > rec_len) {
        wm_fail(st, WALMAP_E_LENGTH, 0);
        return st->status;
    }
    st->rec_len = rec_len;
    size_t k = len < WALMAP_HEAD ? len : WALMAP_HEAD;
    memcpy(st->head, data, k);
    st->got = (uint32_t)len;
    int done = wm_decode(st, k, len == rec_len);
    if (done != 1)
        wm_fail(st, done < 0 ? done : WALMAP_E_HEADER, 0);
    else
        st->records = 1;
    return st->status;
}

/* Sorts and dedupes the output; a record still in progress is decoded from what arrived, if it can
   be (else its head is the caller's tail). Returns the status. */
int walrus_walmap_finish(struct walrus_walmap *st)
{
    if (st->status >= 0 && st->need && !st->foreign && !st->decoded) {
        int done = wm_decode(st, st->got < WALMAP_HEAD ? st->got : WALMAP_HEAD, 0);
        if (done < 0)
            wm_fail(st, done, st->rec_lsn);
        st->decoded = done == 1;
    }
    st->nrefs = wm_unique(st->refs, st->nrefs);
    return st->status;
}

void walrus_walmap_release(struct walrus_walmap *st)
{
    free(st->refs);
    st->refs = NULL;
    st->nrefs = st->cap = 0;
}

/* Sorts references in place and drops repeats; returns how many are left. */
size_t walrus_walmap_unique(uint32_t *refs, size_t n)
{
    return wm_unique(refs, n);
}

/* 1 if the references are sorted and unique (what the merge below needs), else 0. */
int walrus_walmap_sorted(const uint32_t *refs, size_t n)
{
    for (size_t i = 1; i < n; i++)
        if (wm_cmp(refs + 4 * (i - 1), refs + 4 * i) >= 0)
            return 0;
    return 1;
}

/* The end of the group of sorted references that starts at i: those of one relation file (the
   same tablespace, database and relation, blocks in the same `relseg` blocks), or the one
   whole-relation marker at i. */
size_t walrus_walmap_group_end(const uint32_t *refs, size_t n, size_t i, uint32_t relseg)
{
    const uint32_t *r = refs + 4 * i;
    if (r[3] == 0xFFFFFFFFu)
        return i + 1;
    uint32_t seg = r[3] / relseg;
    size_t j = i + 1;
    while (j < n) {
        const uint32_t *q = refs + 4 * j;
        if (q[0] != r[0] || q[1] != r[1] || q[2] != r[2] || q[3] == 0xFFFFFFFFu || q[3] / relseg != seg)
            break;
        j++;
    }
    return j;
}

/* Sets the bit of each block of references i..j (one group) less `first` in bits, which holds
   the group's last block. */
void walrus_walmap_set_bits(uint8_t *bits, const uint32_t *refs, size_t i, size_t j, uint32_t first)
{
    for (; i < j; i++) {
        uint32_t b = refs[4 * i + 3] - first;
        bits[b >> 3] |= (uint8_t)(1u << (b & 7));
    }
}

/* The numbers of the set bits below nbits, in order, into out (room for nbits); returns how many. */
size_t walrus_walmap_list_bits(const uint8_t *bits, size_t nbits, uint32_t *out)
{
    size_t n = 0;
    for (size_t k = 0; k < nbits; k++) {
        if (bits[k >> 3] == 0) {
            k |= 7;  /* a byte without a set bit: on to the next */
            continue;
        }
        if (bits[k >> 3] >> (k & 7) & 1)
            out[n++] = (uint32_t)k;
    }
    return n;
}

size_t walrus_walmap_count_bits(const uint8_t *bits, size_t nbytes)
{
    size_t n = 0;
    for (size_t k = 0; k < nbytes; k++)
        n += (size_t)__builtin_popcount(bits[k]);
    return n;
}

/* The union of two sorted, unique reference lists into out (room for na + nb). */
size_t walrus_walmap_merge(const uint32_t *a, size_t na, const uint32_t *b, size_t nb, uint32_t *out)
{
    size_t i = 0, j = 0, n = 0;
    while (i < na || j < nb) {
        int c = i == na ? 1 : j == nb ? -1 : wm_cmp(a + 4 * i, b + 4 * j);
        const uint32_t *take = c <= 0 ? a + 4 * i : b + 4 * j;
        memcpy(out + 4 * n++, take, 16);
        i += c <= 0;
        j += c >= 0;
    }
    return n;
}
"""

# The io_uring reader's engine (walrus._uring.reader): batches of reads queued in one call each, and
# one call per wake-up of the ring thread that issues what the caps allow, submits and waits once,
# and settles every completion ready: the thread's only Python work per read is filling its record
# once, none per completion. The caller owns every record (struct walrus_rbatch and its arrays,
# filled once per batch) and keeps them alive until the batch is reported finished; the engine
# links records, never allocates.
# Invariants: a request is in exactly one of three states, pending (in the FIFO), in flight (its
# pointer is the user_data of one SQE or CQE) or over; a batch's `left` counts its pending and
# in-flight requests, and the batch is reported finished once, when `left` reaches 0, after which
# the engine holds no pointer into it. At most `entries` reads are in flight (so get_sqe always
# has a slot and the CQ, 2 * entries, never overflows), and a read is issued only while the bytes
# in flight are under `cap` or none is in flight.
READS_SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>

#define WALRUS_MAX_IO 0x7FFFF000u        /* MAX_RW_COUNT: the most one read(2)-style request moves */
#define WALRUS_READS_TIMED_OUT (-ETIME)  /* walrus_reads_step waited and nothing completed */
#define WALRUS_REAP 64                   /* CQEs looked at per peek */

struct walrus_rbatch;

struct walrus_rreq {
    /* the caller's */
    int32_t fd;
    char *addr;                   /* where the bytes go */
    uint64_t offset;              /* of the first byte in the file */
    uint64_t len;                 /* bytes asked; 0: nothing to read */
    /* the engine's */
    int32_t buf_index;            /* the fixed buffer holding [addr, addr + len), or -1: plain READ */
    uint32_t asked;               /* bytes of its read in flight */
    struct walrus_rbatch *batch;
    struct walrus_rreq *next;     /* the pending FIFO */
};

struct walrus_rbatch {
    /* the caller's */
    struct walrus_rreq *reqs;
    uint64_t *done;               /* out: bytes landed per request */
    uint32_t n;
    uint64_t id;                  /* what walrus_reads_step reports */
    /* out: errno of the read that failed the batch (0: none) and its request's index */
    int32_t error;
    uint32_t failed;
    /* the engine's */
    uint32_t left;                /* requests pending or in flight */
    struct walrus_rbatch *next;   /* the finished FIFO */
};

struct walrus_reads {
    uint64_t completions;         /* CQEs reaped */
    uint64_t fixed_reads;         /* reads issued as READ_FIXED */
    uint32_t inflight;            /* reads issued and not reaped */
    uint64_t inflight_bytes;      /* the bytes they ask for */
    uint32_t peak_reads;          /* the most of each at once */
    uint64_t peak_bytes;
    uint32_t pending;             /* requests waiting to be issued */
    uint32_t finished;            /* batches finished and not yet reported */
    uint32_t max_chunk;           /* bytes per read at most: WALRUS_MAX_IO (tests lower it) */
    uint64_t fault_cqe;           /* tests: the fault_cqe'th CQE (1-based) reports fault_res instead */
    int32_t fault_res;
    struct io_uring *ring;
    uint32_t entries;
    uint64_t cap;
    char *fixed_base;             /* registered buffers: fixed_count of fixed_size bytes from fixed_base */
    uint64_t fixed_size;
    uint32_t fixed_count;
    struct walrus_rreq *head, *tail;
    struct walrus_rbatch *done_head, *done_tail;
};

static void rd_queue(struct walrus_reads *r, struct walrus_rreq *q)
{
    q->next = NULL;
    if (r->tail)
        r->tail->next = q;
    else
        r->head = q;
    r->tail = q;
    r->pending++;
}

static void rd_finish(struct walrus_reads *r, struct walrus_rbatch *b)
{
    b->next = NULL;
    if (r->done_tail)
        r->done_tail->next = b;
    else
        r->done_head = b;
    r->done_tail = b;
    r->finished++;
}

/* A failed batch's pending requests leave the FIFO: they are over; its reads in flight still land. */
static void rd_drop(struct walrus_reads *r, struct walrus_rbatch *b)
{
    struct walrus_rreq **link = &r->head, *last = NULL;
    while (*link) {
        struct walrus_rreq *q = *link;
        if (q->batch == b) {
            *link = q->next;
            r->pending--;
            b->left--;
        } else {
            last = q;
            link = &q->next;
        }
    }
    r->tail = last;
}

/* Pending reads to SQEs, oldest first, as far as the caps allow; they go out with the next enter. */
static void rd_issue(struct walrus_reads *r)
{
    while (r->head && r->inflight < r->entries && (r->inflight == 0 || r->inflight_bytes < r->cap)) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(r->ring);
        if (sqe == NULL)  /* cannot happen: no more reads in flight than entries */
            return;
        struct walrus_rreq *q = r->head;
        r->head = q->next;
        if (r->head == NULL)
            r->tail = NULL;
        r->pending--;
        uint64_t got = q->batch->done[q - q->batch->reqs];
        uint64_t rest = q->len - got;
        uint32_t n = rest < r->max_chunk ? (uint32_t)rest : r->max_chunk;
        char *buf = q->addr + got;
        if (q->buf_index >= 0) {
            io_uring_prep_read_fixed(sqe, q->fd, buf, n, q->offset + got, q->buf_index);
            r->fixed_reads++;
        } else
            io_uring_prep_read(sqe, q->fd, buf, n, q->offset + got);
        io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)q);
        q->asked = n;
        r->inflight++;
        r->inflight_bytes += n;
        if (r->inflight > r->peak_reads)
            r->peak_reads = r->inflight;
        if (r->inflight_bytes > r->peak_bytes)
            r->peak_bytes = r->inflight_bytes;
    }
}

/* One CQE of request q: progress, the request over, or its batch failed. */
static void rd_complete(struct walrus_reads *r, struct walrus_rreq *q, int res)
{
    struct walrus_rbatch *b = q->batch;
    uint32_t i = (uint32_t)(q - b->reqs);
    r->inflight--;
    r->inflight_bytes -= q->asked;
    /* O_DIRECT: after a short read ending off a block, the rest can only be asked at an unaligned
       offset, which is EINVAL: the short read was the file's end (as walrus.fileio.reader) */
    if (res == -EINVAL && b->done[i] % 512)
        res = 0;
    if (b->error == 0) {
        if (res < 0 && res != -EINTR && res != -EAGAIN) {
            b->error = -res;
            b->failed = i;
            rd_drop(r, b);
        } else if (res != 0) {
            if (res > 0)
                b->done[i] += (uint64_t)res;
            if (b->done[i] < q->len) {  /* a short read, EINTR or EAGAIN: the rest goes last */
                rd_queue(r, q);
                return;
            }
        }
    }
    /* over: its bytes all landed, end of file (res 0), or its batch failed */
    if (--b->left == 0)
        rd_finish(r, b);
}

/* Every CQE ready now; returns how many. */
static unsigned rd_reap(struct walrus_reads *r)
{
    struct io_uring_cqe *cqes[WALRUS_REAP];
    unsigned total = 0, n;
    while ((n = io_uring_peek_batch_cqe(r->ring, cqes, WALRUS_REAP)) > 0) {
        for (unsigned k = 0; k < n; k++) {
            uint64_t data = cqes[k]->user_data;
            int res = cqes[k]->res;
            if (data == LIBURING_UDATA_TIMEOUT)  /* liburing's own timeout on kernels before 5.11 */
                continue;
            r->completions++;
            if (r->fault_cqe && r->completions == r->fault_cqe)
                res = r->fault_res;
            rd_complete(r, (struct walrus_rreq *)(uintptr_t)data, res);
            total++;
        }
        io_uring_cq_advance(r->ring, n);
    }
    return total;
}

/* Submits what is queued and, with `wait`, waits up to timeout_ms for a completion: 1 when one is
   ready or nothing was waited for, 0 when the wait timed out, -errno when the ring failed. */
static int rd_enter(struct walrus_reads *r, int wait, unsigned timeout_ms)
{
    for (;;) {
        int rc;
        if (wait) {
            struct io_uring_cqe *cqe = NULL;
            struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                           .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
            rc = io_uring_submit_and_wait_timeout(r->ring, &cqe, 1, &ts, NULL);
            if (rc >= 0 && cqe != NULL)
                return 1;
            if (rc >= 0 || rc == -ETIME)  /* liburing reports a timed-out wait that submitted as success */
                return 0;
        } else {
            rc = io_uring_submit(r->ring);
            if (rc >= 0)
                return 1;
        }
        /* EINTR: a signal cut the call short; liburing keeps what the kernel did not take queued */
        if (rc != -EINTR)
            return rc;
    }
}

void walrus_reads_init(struct walrus_reads *r, struct io_uring *ring, unsigned entries, uint64_t cap)
{
    memset(r, 0, sizeof *r);
    r->ring = ring;
    r->entries = entries;
    r->cap = cap;
    r->max_chunk = WALRUS_MAX_IO;
}

/* The buffers registered with the ring (count 0: none). Applies to batches added from now on. */
void walrus_reads_fixed(struct walrus_reads *r, char *base, uint64_t size, uint32_t count)
{
    r->fixed_base = base;
    r->fixed_size = size;
    r->fixed_count = size ? count : 0;
}

/* The fixed buffer that holds all of q's bytes, or -1 when none does (unregistered memory, or a
   slice straddling two buffers): READ_FIXED needs one registered buffer to cover the read. */
static int32_t rd_fixed_index(const struct walrus_reads *r, const struct walrus_rreq *q)
{
    uintptr_t addr = (uintptr_t)q->addr, base = (uintptr_t)r->fixed_base;
    if (r->fixed_count == 0 || addr < base)
        return -1;
    uint64_t rel = addr - base, index = rel / r->fixed_size;
    if (index >= r->fixed_count || rel + q->len > (index + 1) * r->fixed_size)
        return -1;
    return (int32_t)index;
}

/* Queues a batch's requests behind every request queued before. The batch may finish here (no
   request to read); it is reported by the next step either way. */
void walrus_reads_add(struct walrus_reads *r, struct walrus_rbatch *b)
{
    b->error = 0;
    b->failed = 0;
    b->left = 0;
    for (uint32_t i = 0; i < b->n; i++) {
        struct walrus_rreq *q = &b->reqs[i];
        b->done[i] = 0;
        q->batch = b;
        q->buf_index = rd_fixed_index(r, q);
        if (q->len) {
            rd_queue(r, q);
            b->left++;
        }
    }
    if (b->left == 0)
        rd_finish(r, b);
}

/* One wake-up of the ring thread: issues what the caps allow, submits, waits (with `wait`, unless a
   finished batch is waiting to be reported) up to timeout_ms for a completion, settles every CQE
   ready, and writes the ids of up to `room` finished batches to `out`. Returns their count (0: reads
   progressed, none finished), WALRUS_READS_TIMED_OUT when it waited and nothing completed, or
   -errno when the ring failed (the engine is then unusable: its requests' fate is unknown). */
int walrus_reads_step(struct walrus_reads *r, int wait, unsigned timeout_ms, uint64_t *out, unsigned room)
{
    rd_issue(r);
    int waiting = wait && r->finished == 0 && r->inflight > 0;
    int ready = 1;
    if (waiting || io_uring_sq_ready(r->ring)) {
        ready = rd_enter(r, waiting, timeout_ms);
        if (ready < 0)
            return ready;
    }
    unsigned reaped = rd_reap(r);
    if (waiting && !ready && reaped == 0)
        return WALRUS_READS_TIMED_OUT;
    unsigned k = 0;
    while (k < room && r->done_head) {
        struct walrus_rbatch *b = r->done_head;
        r->done_head = b->next;
        out[k++] = b->id;
    }
    if (r->done_head == NULL)
        r->done_tail = NULL;
    r->finished -= k;
    return (int)k;
}
"""

# A COPY's data read from libpq without a Python step per message (walrus.pg.copyfill): a base
# backup's stream is ~32 KiB CopyData messages, a WAL stream under many small commits one message a
# commit, and reading each through psycopg costs more CPU than the rest of the work. libpq is reached
# through the function pointers of the copy psycopg loaded (its own, in the binary wheel), never
# linked here: a PGconn must only meet the libpq that made it. The GIL is released around the call
# (cffi's default), so the loop runs beside the compress threads.
COPY_SOURCE = r"""
#include <poll.h>

#define WALRUS_COPY_FULL 0   /* dst is full */
#define WALRUS_COPY_EVENT 1  /* the next message is not data to copy: msg/len hold it, whole */
#define WALRUS_COPY_END 2    /* the copy ended (the command's results follow) */
#define WALRUS_COPY_ERROR 3  /* libpq failed: PQerrorMessage says why */
#define WALRUS_COPY_WAIT 4   /* nothing arrived for timeout_ms (0: nothing is waiting now), or a signal */

typedef int (*wc_get_copy_data)(void *conn, char **buffer, int async);
typedef int (*wc_consume_input)(void *conn);
typedef void (*wc_freemem)(void *ptr);
typedef int (*wc_socket)(const void *conn);

struct walrus_copy {
    void *conn;           /* PGconn *, nonblocking, in COPY OUT or COPY BOTH */
    void *get_copy_data;  /* PQgetCopyData */
    void *consume_input;  /* PQconsumeInput */
    void *freemem;        /* PQfreemem */
    void *socket;         /* PQsocket */
    char kind;            /* the type byte of the messages whose data is copied ('d', or 'w' for WAL) */
    int skip;             /* their header bytes before the data (1; 25 for XLogData) */
    int check_lsn;        /* XLogData: a message's start must be lsn, else it is an event */
    uint64_t lsn;         /* the position of the next data byte (advanced as bytes are copied) */
    char *msg;            /* the message held, libpq's (NULL: none) */
    int len;              /* its length */
    int pos;              /* its bytes copied out so far; -1: it is an event, not data */
};

/* Frees the message held, if any (the caller took an event's, or abandons the copy). */
void walrus_copy_drop(struct walrus_copy *c)
{
    if (c->msg)
        ((wc_freemem)c->freemem)(c->msg);
    c->msg = NULL;
    c->len = c->pos = 0;
}

static uint64_t wc_be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* Copies the data of consecutive data messages into dst until cap bytes, or until what the status
   says stops it; returns the bytes copied. A message split across calls resumes where it stopped. */
size_t walrus_copy_fill(struct walrus_copy *c, char *dst, size_t cap, int timeout_ms, int *status)
{
    size_t got = 0;
    while (got < cap) {
        if (c->msg) {
            if (c->pos < 0) {
                *status = WALRUS_COPY_EVENT;
                return got;
            }
            size_t k = (size_t)(c->len - c->pos);
            if (k > cap - got)
                k = cap - got;
            memcpy(dst + got, c->msg + c->pos, k);
            got += k;
            c->pos += (int)k;
            c->lsn += k;
            if (c->pos == c->len)
                walrus_copy_drop(c);
            continue;
        }
        char *buf = NULL;
        int n = ((wc_get_copy_data)c->get_copy_data)(c->conn, &buf, 1);
        if (n > 0) {
            int data = buf[0] == c->kind && n >= c->skip
                && (!c->check_lsn || wc_be64((const unsigned char *)buf + 1) == c->lsn);
            c->msg = buf;
            c->len = n;
            c->pos = data ? c->skip : -1;
            continue;
        }
        if (n == -1) {
            *status = WALRUS_COPY_END;
            return got;
        }
        if (n < -1) {
            *status = WALRUS_COPY_ERROR;
            return got;
        }
        struct pollfd p = { ((wc_socket)c->socket)(c->conn), POLLIN, 0 };
        int ready = poll(&p, 1, timeout_ms);
        if (ready <= 0) {  /* silence, or EINTR: the caller looks at its stop flag and its clock */
            *status = WALRUS_COPY_WAIT;
            return got;
        }
        if (!((wc_consume_input)c->consume_input)(c->conn)) {
            *status = WALRUS_COPY_ERROR;
            return got;
        }
    }
    *status = WALRUS_COPY_FULL;
    return got;
}
"""

# libsodium's secretstream over many 8 KiB chunks in one call (walrus.crypto.libsodium): WAL-G's
# framing seals every 8 KiB on its own, and a call per chunk from Python releases and takes back the
# GIL each time, which beside the compress threads cost a backup ~13 thread switches per buffer and
# made it wait its turn for the GIL 27 times a buffer. libsodium is PyNaCl's copy, reached through
# the function pointers its cffi module gives (crypto_secretstream_xchacha20poly1305_push/_pull),
# never linked here; `state` is the stream's state, which PyNaCl allocated. Sealed chunks are
# `chunk` + 17 bytes (ABYTES: one encrypted tag byte and a 16-byte MAC).
SECRETSTREAM_SOURCE = r"""
#define WALRUS_SS_ABYTES 17

typedef int (*walrus_ss_push_fn)(void *state, unsigned char *c, unsigned long long *clen,
                                 const unsigned char *m, unsigned long long mlen,
                                 const unsigned char *ad, unsigned long long adlen, unsigned char tag);
typedef int (*walrus_ss_pull_fn)(void *state, unsigned char *m, unsigned long long *mlen, unsigned char *tag,
                                 const unsigned char *c, unsigned long long clen,
                                 const unsigned char *ad, unsigned long long adlen);

/* Seals n chunks of `chunk` bytes from src into dst, each with `tag`; returns how many were sealed
   (n, unless libsodium refused one: it does not for valid arguments). */
size_t walrus_ss_push(uintptr_t push, uintptr_t state, unsigned char *dst, const unsigned char *src, size_t n,
                      size_t chunk, unsigned char tag)
{
    walrus_ss_push_fn f = (walrus_ss_push_fn)push;
    size_t sealed = chunk + WALRUS_SS_ABYTES;
    for (size_t i = 0; i < n; i++)
        if (f((void *)state, dst + i * sealed, NULL, src + i * chunk, chunk, NULL, 0, tag) != 0)
            return i;
    return n;
}

/* Opens n sealed chunks of `chunk` + 17 bytes from src into dst (`chunk` bytes each). Returns the
   number opened: n, or fewer when one carried a tag other than MESSAGE (0), which is then the last
   one opened and whose tag *tag holds; -(i + 1) when chunk i does not authenticate (the state is
   then spent, as libsodium leaves it). */
long walrus_ss_pull(uintptr_t pull, uintptr_t state, unsigned char *dst, const unsigned char *src, size_t n,
                    size_t chunk, unsigned char *tag)
{
    walrus_ss_pull_fn f = (walrus_ss_pull_fn)pull;
    size_t sealed = chunk + WALRUS_SS_ABYTES;
    *tag = 0;
    for (size_t i = 0; i < n; i++) {
        if (f((void *)state, dst + i * chunk, NULL, tag, src + i * sealed, sealed, NULL, 0) != 0)
            return -(long)(i + 1);
        if (*tag != 0)
            return (long)(i + 1);
    }
    return (long)n;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
# -O3: the page checksum's 32 lanes vectorise (PostgreSQL builds checksum.c with its vectorising flags too)
ffibuilder.set_source(MODULE, f"#include <{HEADER}>\n" + PAGES_SOURCE + WALMAP_SOURCE + READS_SOURCE
                      + COPY_SOURCE + SECRETSTREAM_SOURCE,
                      libraries=["uring"], extra_compile_args=["-O3"])


def _include_dirs() -> list[str]:
    dirs = [d for var in ("CPATH", "C_INCLUDE_PATH") for d in os.environ.get(var, "").split(os.pathsep) if d]
    flags = f"{os.environ.get('CPPFLAGS', '')} {os.environ.get('CFLAGS', '')}".split()
    dirs += [f[2:] for f in flags if f.startswith("-I") and len(f) > 2]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs.append(f"/usr/include/{multiarch}")
    return dirs + ["/usr/local/include", "/usr/include"]


def _require_liburing() -> None:
    """Fails the build up front with the fix, instead of a compiler error deep in the build log."""
    if not any(os.path.isfile(os.path.join(d, HEADER)) for d in _include_dirs()):
        raise SystemExit(
            f"walrus: cannot build the io_uring module: {HEADER} not found "
            f"(searched {', '.join(_include_dirs())}).\n"
            "Install liburing's development files first: `apt-get install liburing-dev` "
            "(Debian/Ubuntu) or `dnf install liburing-devel` (Fedora/RHEL).")


CLIENT_SOURCE = os.path.join("walrus", "daemon", "client.py")
CLIENT_SCRIPT = os.path.join("build", "scripts-walrus", "walg-daemon-client")

# PostgreSQL runs the daemon client once per WAL segment, serially, so its start-up is paid by the
# archiver and by recovery on every segment. A console script runs the venv's python with
# site-packages (20 ms in an editable install, 11 in a plain one); `python -IS` on the stand-alone
# client takes 7. pip rewrites only `#!python` shebangs, and drops their flags, so the script starts
# as sh, which execs the python beside the script (the venv's bin/, or /usr/bin through the packages'
# symlink) without forking anything. To Python the sh part is the module's first string.
CLIENT_PRELUDE = "\n".join([
    "#!/bin/sh",
    "''':'",
    'py="${0%/*}/python3"',
    '[ -x "$py" ] || py=python3',
    'exec "$py" -IS "$0" "$@"',
    "'''",
    "",
])


def _write_client_script() -> str:
    """build/scripts-walrus/walg-daemon-client: the prelude, then walrus/daemon/client.py verbatim."""
    root = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(root, CLIENT_SOURCE), encoding="utf-8") as f:
        source = f.read()
    if "from __future__" in source:
        raise SystemExit(f"walrus: {CLIENT_SOURCE} cannot use __future__ imports: the prelude comes first")
    target = os.path.join(root, CLIENT_SCRIPT)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write(CLIENT_PRELUDE + source)
    os.chmod(target, 0o755)
    return CLIENT_SCRIPT


def build_in_place() -> str:
    """Compiles the module into walrus/_uring/ of this tree (`python build_uring.py`, for development;
    installs build it through the backend below). The new file replaces the old one by a rename, so a
    process that has the old one loaded keeps it intact."""
    import shutil
    import tempfile

    _require_liburing()
    root = os.path.dirname(os.path.abspath(__file__))
    package, name = MODULE.rsplit(".", 1)
    target = os.path.join(root, *package.split("."), f"{name}.abi3.so")
    with tempfile.TemporaryDirectory(prefix="walrus-uring-build-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, target=f"{name}.abi3.so")
        shutil.copyfile(built, target + ".new")
    os.chmod(target + ".new", 0o755)
    os.replace(target + ".new", target)
    return target


class _Backend(_setuptools_backend._BuildMetaBackend):
    """setuptools.build_meta with cffi's `cffi_modules` keyword, which pyproject.toml cannot express.

    setuptools runs a default `setup()` when there is no setup.py; this backend runs that same call
    with the cffi module added, so `pip install .`, `pip install -e .` and wheel builds all compile it.
    """

    def run_setup(self, setup_script: str = "setup.py") -> None:
        import setuptools

        # script_name: sdists ship the setup script, and this file is ours (a wheel built from the
        # sdist needs it as backend and as cffi build script)
        setuptools.setup(cffi_modules=[f"{SCRIPT}:ffibuilder"], script_name=SCRIPT,
                         scripts=[_write_client_script()])

    def build_wheel(self, wheel_directory, config_settings=None, metadata_directory=None):
        _require_liburing()
        return super().build_wheel(wheel_directory, config_settings, metadata_directory)

    def build_editable(self, wheel_directory, config_settings=None, metadata_directory=None):
        _require_liburing()
        return super().build_editable(wheel_directory, config_settings, metadata_directory)


_BACKEND = _Backend()
get_requires_for_build_wheel = _BACKEND.get_requires_for_build_wheel
get_requires_for_build_sdist = _BACKEND.get_requires_for_build_sdist
get_requires_for_build_editable = _BACKEND.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _BACKEND.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _BACKEND.prepare_metadata_for_build_editable
build_wheel = _BACKEND.build_wheel
build_editable = _BACKEND.build_editable
build_sdist = _BACKEND.build_sdist


if __name__ == "__main__":
    print(build_in_place())
