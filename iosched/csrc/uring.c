/* kvmm iosched: the smallest io_uring binding the scheduler needs, called through ctypes
 * (which releases the GIL around every call).
 *
 *   kvr_open(entries, &err)       a ring (NULL and err = errno when the kernel refuses)
 *   kvr_prep(r, op, fd, iov, n, offset, user_data)
 *                                 queue one READV (op 0) or WRITEV (op 1) SQE; -EBUSY if full
 *   kvr_submit(r)                 one io_uring_enter for everything queued; count or -errno
 *   kvr_reap(r, wait, ud[], res[], max, &entered)
 *                                 up to max completions, waiting for >= 1 when wait != 0;
 *                                 entered = io_uring_enter calls made (0 or 1)
 *   kvr_close(r)
 * Prior art: liburing's examples/io_uring-cp.c. Left out: SQPOLL, registered buffers/files
 * (each needs privileges or pinning that the caller's budget would have to cover).
 */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <sys/uio.h>

struct kvr {
    struct io_uring ring;
};

void *kvr_open(unsigned entries, int *err)
{
    struct kvr *r = calloc(1, sizeof *r);
    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    int rc = io_uring_queue_init(entries, &r->ring, 0);
    if (rc < 0) {
        *err = -rc;
        free(r);
        return NULL;
    }
    *err = 0;
    return r;
}

void kvr_close(void *p)
{
    struct kvr *r = p;
    if (!r)
        return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

int kvr_prep(void *p, int op, int fd, const struct iovec *iov, unsigned niov,
             unsigned long long offset, unsigned long long user_data)
{
    struct kvr *r = p;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe)
        return -EBUSY;
    if (op == 0)
        io_uring_prep_readv(sqe, fd, iov, niov, offset);
    else
        io_uring_prep_writev(sqe, fd, iov, niov, offset);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int kvr_submit(void *p)
{
    struct kvr *r = p;
    int rc;
    do {
        rc = io_uring_submit(&r->ring);
    } while (rc == -EINTR);
    return rc;
}

int kvr_reap(void *p, int wait, unsigned long long *ud, int *res, int max, int *entered)
{
    struct kvr *r = p;
    struct io_uring_cqe *cqe;
    int n = 0, rc;
    *entered = 0;
    if (wait && io_uring_peek_cqe(&r->ring, &cqe) != 0) {
        do {
            rc = io_uring_wait_cqe(&r->ring, &cqe);
            *entered += 1;
        } while (rc == -EINTR);
        if (rc < 0)
            return rc;
    }
    while (n < max && io_uring_peek_cqe(&r->ring, &cqe) == 0) {
        ud[n] = io_uring_cqe_get_data64(cqe);
        res[n] = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        n++;
    }
    return n;
}
