#include "uring.h"

#include <cerrno>

namespace thaw {

std::unique_ptr<UringQueue> UringQueue::Create(unsigned depth, int* err) {
  std::unique_ptr<UringQueue> q(new UringQueue());
  // At most `depth` requests are in flight, so a ring of `depth` SQEs (rounded up by the kernel) and
  // its default 2x CQ ring never overflow.
  int rc = io_uring_queue_init(depth, &q->ring_, 0);
  if (rc < 0) {
    q->ring_.ring_fd = -1;  // nothing to tear down
    *err = rc;
    return nullptr;
  }
  *err = 0;
  return q;
}

UringQueue::~UringQueue() {
  // Tearing the ring down cancels and waits for requests still in flight.
  if (ring_.ring_fd >= 0) io_uring_queue_exit(&ring_);
}

int UringQueue::Enqueue(const IoRequest& req) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    int rc = Flush();
    if (rc < 0) return rc;
    sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) return -EBUSY;
  }
  if (req.kind == OpKind::kRead) {
    io_uring_prep_read(sqe, req.fd, req.buf, static_cast<unsigned>(req.len), req.offset);
  } else {
    io_uring_prep_write(sqe, req.fd, req.buf, static_cast<unsigned>(req.len), req.offset);
  }
  sqe->user_data = req.tag;
  ++queued_;
  return 0;
}

int UringQueue::Flush() {
  while (queued_ > 0) {
    int rc = io_uring_submit(&ring_);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) {
      queued_ = 0;  // left in the SQ ring unsubmitted; never executed once the ring is torn down
      return rc;
    }
    if (rc == 0) return -EBUSY;
    unsigned n = static_cast<unsigned>(rc) > queued_ ? queued_ : static_cast<unsigned>(rc);
    queued_ -= n;
    in_flight_ += n;
  }
  return 0;
}

int UringQueue::Reap(IoCompletion* out, int max) {
  if (in_flight_ == 0 || max <= 0) return -EINVAL;
  io_uring_cqe* cqe = nullptr;
  int rc;
  do {
    rc = io_uring_wait_cqe(&ring_, &cqe);
  } while (rc == -EINTR);
  if (rc < 0) return rc;
  int n = 0;
  while (cqe != nullptr && n < max) {
    out[n].tag = cqe->user_data;
    out[n].result = cqe->res;
    ++n;
    io_uring_cqe_seen(&ring_, cqe);
    cqe = nullptr;
    if (io_uring_peek_cqe(&ring_, &cqe) != 0) break;
  }
  in_flight_ -= static_cast<unsigned>(n);
  return n;
}

std::unique_ptr<IoQueue> MakeUringQueue(unsigned depth, int* err) { return UringQueue::Create(depth, err); }

}  // namespace thaw
