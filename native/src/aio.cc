#include "aio.h"

#include <cerrno>
#include <cstring>

namespace thaw {

std::unique_ptr<AioQueue> AioQueue::Create(unsigned depth, int* err) {
  std::unique_ptr<AioQueue> q(new AioQueue());
  int rc = io_setup(static_cast<int>(depth), &q->ctx_);  // libaio returns -errno
  if (rc < 0) {
    q->ctx_ = nullptr;
    *err = rc;
    return nullptr;
  }
  q->pending_.reserve(depth);
  q->events_.resize(depth);
  *err = 0;
  return q;
}

AioQueue::~AioQueue() {
  // io_destroy cancels outstanding requests and waits for the rest.
  if (ctx_ != nullptr) io_destroy(ctx_);
}

int AioQueue::Enqueue(const IoRequest& req) {
  iocb cb;
  std::memset(&cb, 0, sizeof cb);
  if (req.kind == OpKind::kRead) {
    io_prep_pread(&cb, req.fd, req.buf, req.len, static_cast<long long>(req.offset));
  } else {
    io_prep_pwrite(&cb, req.fd, req.buf, req.len, static_cast<long long>(req.offset));
  }
  cb.data = reinterpret_cast<void*>(static_cast<uintptr_t>(req.tag));
  pending_.push_back(cb);
  return 0;
}

int AioQueue::Flush() {
  // The kernel copies each iocb during io_submit, so the vector may be reused right after.
  pending_ptrs_.clear();
  for (iocb& cb : pending_) pending_ptrs_.push_back(&cb);
  size_t done = 0;
  int result = 0;
  while (done < pending_ptrs_.size()) {
    int rc = io_submit(ctx_, static_cast<long>(pending_ptrs_.size() - done), pending_ptrs_.data() + done);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) {
      result = rc;
      break;
    }
    if (rc == 0) {
      result = -EBUSY;
      break;
    }
    done += static_cast<size_t>(rc);
    in_flight_ += static_cast<unsigned>(rc);
  }
  pending_.clear();
  return result;
}

int AioQueue::Reap(IoCompletion* out, int max) {
  if (in_flight_ == 0 || max <= 0) return -EINVAL;
  if (static_cast<size_t>(max) > events_.size()) max = static_cast<int>(events_.size());
  int rc;
  do {
    rc = io_getevents(ctx_, 1, max, events_.data(), nullptr);
  } while (rc == -EINTR);
  if (rc < 0) return rc;
  for (int i = 0; i < rc; ++i) {
    out[i].tag = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(events_[i].data));
    // res carries bytes or -errno in an unsigned long.
    out[i].result = static_cast<int64_t>(static_cast<long>(events_[i].res));
  }
  in_flight_ -= static_cast<unsigned>(rc);
  return rc;
}

std::unique_ptr<IoQueue> MakeAioQueue(unsigned depth, int* err) { return AioQueue::Create(depth, err); }

}  // namespace thaw
