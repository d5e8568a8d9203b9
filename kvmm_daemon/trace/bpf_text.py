"""The C fragments of the BPF programs, one per probe; `programs.build_program` assembles them.

Conventions every fragment follows: a probe filters with `is_target()` (the current task's
thread group is in `targets`) before recording anything (only the FUSE probe keeps a start
entry for every request, as the server answering it is known only at the reply); start maps (timestamps of events not
finished) are LRU hashes so a lost completion cannot fill them; results go to the shared
`totals` per-CPU array (`T_*` indexes), the shared `hist` log2 histogram (`H_*` kinds) or a
per-number `op_stat` hash (count, ns, errors) updated with atomic adds. The `T_*`/`H_*`
defines come from `programs.TOTALS`/`HISTS`, so Python and C share one layout.
Tracepoint arguments are read through bcc's `args` (its structs come from the tracefs
format files at compile time, so field offsets always match the running kernel).

Left out: anything needing kprobes, stacks or perf buffers (see programs.py).
"""

HEADER = r"""
#include <uapi/linux/ptrace.h>

%(defines)s

struct hist_key { u32 kind; u32 slot; };
struct op_stat { u64 count; u64 ns; u64 errors; };

BPF_HASH(targets, u32, u8, 10240);
BPF_PERCPU_ARRAY(totals, u64, N_TOTALS);
BPF_HASH(hist, struct hist_key, u64, 1024);

static __always_inline int is_target(void) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return targets.lookup(&tgid) != NULL;
}

static __always_inline void add_total(u32 idx, u64 value) {
    u64 *p = totals.lookup(&idx);
    if (p)
        *p += value;
}

static __always_inline void add_hist(u32 kind, u64 usec) {
    struct hist_key key = {};
    key.kind = kind;
    key.slot = bpf_log2l(usec);
    hist.increment(key);
}

static __always_inline void add_op(struct op_stat *s, u64 ns, int failed) {
    __sync_fetch_and_add(&s->count, 1);
    __sync_fetch_and_add(&s->ns, ns);
    if (failed)
        __sync_fetch_and_add(&s->errors, 1);
}
"""

CHILDREN = r"""
TRACEPOINT_PROBE(sched, sched_process_fork) {
    if (!is_target())
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    targets.update(&child, &one);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    if (tid != (u32)(id >> 32))
        targets.delete(&tid);   /* a thread's own entry, added at its clone */
    return 0;
}
"""

BIO_QUEUE = r"""
BPF_TABLE("lru_hash", u64, u8, bio_owner, 10240);

TRACEPOINT_PROBE(block, block_bio_queue) {
    if (!is_target())
        return 0;
    u64 sector = args->sector;
    u8 one = 1;
    bio_owner.update(&sector, &one);
    return 0;
}
"""

BLOCK = r"""
struct rq_key { u64 dev; u64 sector; };
struct rq_val { u64 ts; u64 bytes; u32 op; u32 file; };
struct file_ext { u64 dev; u64 start; u64 end; u32 file; u32 pad; };  /* sectors [start, end) */
BPF_TABLE("lru_hash", struct rq_key, struct rq_val, rq_start, 10240);
BPF_ARRAY(file_ext, struct file_ext, MAX_FILE_EXTENTS);

/* 1 + the index in programs.FILE_KINDS of the file whose extents hold the sector, or 0;
   user space fills file_ext in order and ends it with an entry of file 0. */
static __always_inline u32 file_of(u64 dev, u64 sector) {
    for (u32 i = 0; i < MAX_FILE_EXTENTS; i++) {
        u32 k = i;
        struct file_ext *e = file_ext.lookup(&k);
        if (!e || e->file == 0)
            break;
        if (e->dev == dev && sector >= e->start && sector < e->end)
            return e->file;
    }
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_issue) {
    u64 sector = args->sector;
    int ours = is_target();
%(bio_owner_check)s
    if (!ours)
        return 0;
    char c0 = args->rwbs[0], c1 = args->rwbs[1], c2 = args->rwbs[2];
    struct rq_key key = {};
    key.dev = args->dev;
    key.sector = sector;
    struct rq_val val = {};
    val.ts = bpf_ktime_get_ns();
    val.bytes = (u64)args->nr_sector << 9;
    val.op = (c0 == 'W' || c1 == 'W' || c2 == 'W') ? 1 : (c0 == 'R' || c1 == 'R' || c2 == 'R') ? 0 : 2;
    val.file = val.bytes ? file_of(key.dev, sector) : 0;
    rq_start.update(&key, &val);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete) {
    struct rq_key key = {};
    key.dev = args->dev;
    key.sector = args->sector;
    struct rq_val *val = rq_start.lookup(&key);
    if (!val)
        return 0;
    u64 delta = bpf_ktime_get_ns() - val->ts;
    u32 op = val->op;
    u64 bytes = val->bytes;
    u32 file = val->file;
    rq_start.delete(&key);
    if (op > 2)
        return 0;
    add_total(T_BLOCK_READ_IOS + op * 3, 1);
    add_total(T_BLOCK_READ_BYTES + op * 3, bytes);
    add_total(T_BLOCK_READ_NS + op * 3, delta);
    add_hist(H_BLOCK_READ + op, delta / 1000);
    if (file >= 1 && file <= N_FILE_KINDS) {
        add_total(T_FILE_WEIGHTS_IOS + (file - 1) * 3, 1);
        add_total(T_FILE_WEIGHTS_BYTES + (file - 1) * 3, bytes);
        add_total(T_FILE_WEIGHTS_NS + (file - 1) * 3, delta);
        add_hist(H_FILE_WEIGHTS + (file - 1), delta / 1000);
    }
    return 0;
}
"""

BIO_OWNER_CHECK = r"""    if (bio_owner.lookup(&sector)) {
        ours = 1;
        bio_owner.delete(&sector);
    }"""

SYSCALLS = r"""
/* futex: 0 not a futex wait or wake, 1 a wait (WAIT, WAIT_BITSET, WAIT_REQUEUE_PI, LOCK_PI*),
   2 a wake (WAKE, WAKE_BITSET, WAKE_OP, *REQUEUE*, UNLOCK_PI): the op without
   FUTEX_PRIVATE_FLAG/FUTEX_CLOCK_REALTIME, classified at entry, counted at exit. */
struct sys_val { u64 ts; u32 futex; u32 pad; };
BPF_TABLE("lru_hash", u32, struct sys_val, sys_start, 10240);
BPF_HASH(sys_stats, u32, struct op_stat, 1024);

TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    if (!is_target())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct sys_val val = {};
    val.ts = bpf_ktime_get_ns();
    if (args->id == FUTEX_NR) {
        u32 cmd = args->args[1] & 0x7f;
        val.futex = (cmd == 0 || cmd == 9 || cmd == 11 || cmd == 6 || cmd == 13) ? 1
                  : (cmd == 1 || cmd == 10 || cmd == 5 || cmd == 3 || cmd == 4 || cmd == 7 || cmd == 12) ? 2 : 0;
    }
    sys_start.update(&tid, &val);
    return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    u32 tid = bpf_get_current_pid_tgid();
    struct sys_val *val = sys_start.lookup(&tid);
    if (!val)
        return 0;
    u64 delta = bpf_ktime_get_ns() - val->ts;
    u32 futex = val->futex;
    sys_start.delete(&tid);
    u32 nr = args->id;
    struct op_stat zero = {};
    struct op_stat *s = sys_stats.lookup_or_try_init(&nr, &zero);
    if (s)
        add_op(s, delta, args->ret < 0);
    if (futex == 1)
        add_total(T_FUTEX_WAITS, 1);
    if (futex == 2) {
        add_total(T_FUTEX_WAKES, 1);
        if (args->ret > 0)
            add_total(T_FUTEX_WOKEN, args->ret);
    }
    return 0;
}
"""

OFFCPU = r"""
struct off_val { u64 ts; u32 kind; };
BPF_TABLE("lru_hash", u32, struct off_val, off_start, 10240);

TRACEPOINT_PROBE(sched, sched_switch) {
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid;
    if (prev != 0 && is_target()) {          /* current is still the task switched out */
        long state = args->prev_state;
        struct off_val val = {};
        val.ts = now;
        /* 0 or TASK_REPORT_MAX (0x100+): preempted while runnable; D (0x2): uninterruptible */
        val.kind = (state == 0 || state >= 0x100) ? 0 : (state & 2) ? 2 : 1;
        off_start.update(&prev, &val);
    }
    u32 next = args->next_pid;
    struct off_val *val = off_start.lookup(&next);
    if (!val)
        return 0;
    u64 delta = now - val->ts;
    u32 kind = val->kind;
    off_start.delete(&next);
    if (kind > 2)
        return 0;
    add_total(T_OFFCPU_PREEMPTED_COUNT + kind * 2, 1);
    add_total(T_OFFCPU_PREEMPTED_NS + kind * 2, delta);
    add_hist(H_OFFCPU_PREEMPTED + kind, delta / 1000);
    return 0;
}
"""

FAULTS = r"""
TRACEPOINT_PROBE(exceptions, page_fault_user) {
    if (!is_target())
        return 0;
    add_total(T_FAULTS_USER, 1);
    if (args->error_code & 2)
        add_total(T_FAULTS_WRITE, 1);
    return 0;
}
"""

FUSE = r"""
#include <uapi/linux/fuse.h>   /* enum fuse_opcode, the type of the tracepoint's opcode field */

struct fuse_key { u64 conn; u64 unique; };
struct fuse_val { u64 ts; u32 opcode; u32 sent_by_target; };
struct fuse_stat_key { u32 opcode; u32 role; };
BPF_TABLE("lru_hash", struct fuse_key, struct fuse_val, fuse_start, 10240);
BPF_HASH(fuse_stats, struct fuse_stat_key, struct op_stat, 1024);

TRACEPOINT_PROBE(fuse, fuse_request_send) {
    struct fuse_key key = {};
    key.conn = args->connection;
    key.unique = args->unique;
    struct fuse_val val = {};
    val.ts = bpf_ktime_get_ns();
    val.opcode = args->opcode;
    val.sent_by_target = is_target();
    fuse_start.update(&key, &val);
    return 0;
}

TRACEPOINT_PROBE(fuse, fuse_request_end) {
    struct fuse_key key = {};
    key.conn = args->connection;
    key.unique = args->unique;
    struct fuse_val *val = fuse_start.lookup(&key);
    if (!val)
        return 0;
    u64 delta = bpf_ktime_get_ns() - val->ts;
    struct fuse_stat_key sk = {};
    sk.opcode = val->opcode;
    u32 sent = val->sent_by_target;
    fuse_start.delete(&key);
    struct op_stat zero = {};
    int failed = args->error < 0;
    if (sent) {
        sk.role = 0;
        struct op_stat *s = fuse_stats.lookup_or_try_init(&sk, &zero);
        if (s)
            add_op(s, delta, failed);
    }
    if (is_target()) {                        /* the reply is written by the server */
        sk.role = 1;
        struct op_stat *s = fuse_stats.lookup_or_try_init(&sk, &zero);
        if (s)
            add_op(s, delta, failed);
    }
    return 0;
}
"""

IO_URING = r"""
struct uring_val { u64 ts; u32 opcode; };
BPF_TABLE("lru_hash", u64, struct uring_val, uring_start, 10240);
BPF_HASH(uring_stats, u32, struct op_stat, 256);

TRACEPOINT_PROBE(io_uring, io_uring_submit_req) {
    if (!is_target())
        return 0;
    u64 req = (u64)args->req;
    struct uring_val val = {};
    val.ts = bpf_ktime_get_ns();
    val.opcode = args->opcode;
    uring_start.update(&req, &val);
    add_total(T_IO_URING_SUBMITTED, 1);
    return 0;
}

TRACEPOINT_PROBE(io_uring, io_uring_complete) {
    u64 req = (u64)args->req;
    struct uring_val *val = uring_start.lookup(&req);
    if (!val)
        return 0;
    u64 delta = bpf_ktime_get_ns() - val->ts;
    u32 opcode = val->opcode;
    uring_start.delete(&req);
    add_total(T_IO_URING_COMPLETED, 1);
    struct op_stat zero = {};
    struct op_stat *s = uring_stats.lookup_or_try_init(&opcode, &zero);
    if (s)
        add_op(s, delta, args->res < 0);
    return 0;
}
"""

FRAGMENTS = {"syscalls": SYSCALLS, "offcpu": OFFCPU, "faults": FAULTS, "fuse": FUSE, "io_uring": IO_URING}
