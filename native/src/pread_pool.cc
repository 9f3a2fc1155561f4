#include "pread_pool.h"

#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace thaw {

std::unique_ptr<PreadQueue> PreadQueue::Create(unsigned threads, int* err) {
  std::unique_ptr<PreadQueue> q(new PreadQueue());
  try {
    for (unsigned i = 0; i < threads; ++i) q->threads_.emplace_back([p = q.get()] { p->Work(); });
  } catch (const std::system_error& e) {
    q->Stop();
    *err = e.code().value() > 0 ? -e.code().value() : -EAGAIN;
    return nullptr;
  }
  *err = 0;
  return q;
}

PreadQueue::~PreadQueue() { Stop(); }

void PreadQueue::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    jobs_.clear();  // never started: nobody touches their buffers
  }
  jobs_cv_.notify_all();
  // A thread in the middle of a request finishes it before exiting, so buffers outlive every use.
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

void PreadQueue::Work() {
  for (;;) {
    IoRequest req;
    {
      std::unique_lock<std::mutex> lock(mu_);
      jobs_cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      req = jobs_.front();
      jobs_.pop_front();
    }
    ssize_t rc;
    do {
      rc = req.kind == OpKind::kRead ? ::pread(req.fd, req.buf, req.len, static_cast<off_t>(req.offset))
                                     : ::pwrite(req.fd, req.buf, req.len, static_cast<off_t>(req.offset));
    } while (rc < 0 && errno == EINTR);
    IoCompletion c{req.tag, rc < 0 ? -static_cast<int64_t>(errno) : static_cast<int64_t>(rc)};
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_.push_back(c);
    }
    done_cv_.notify_one();
  }
}

int PreadQueue::Enqueue(const IoRequest& req) {
  pending_.push_back(req);
  return 0;
}

int PreadQueue::Flush() {
  if (pending_.empty()) return 0;
  size_t n = pending_.size();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const IoRequest& r : pending_) jobs_.push_back(r);
  }
  pending_.clear();
  in_flight_ += static_cast<unsigned>(n);
  if (n == 1) {
    jobs_cv_.notify_one();
  } else {
    jobs_cv_.notify_all();
  }
  return 0;
}

int PreadQueue::Reap(IoCompletion* out, int max) {
  if (in_flight_ == 0 || max <= 0) return -EINVAL;
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return !done_.empty(); });
  int n = 0;
  while (!done_.empty() && n < max) {
    out[n++] = done_.back();
    done_.pop_back();
  }
  in_flight_ -= static_cast<unsigned>(n);
  return n;
}

std::unique_ptr<IoQueue> MakePreadQueue(unsigned depth, int* err) { return PreadQueue::Create(depth, err); }

}  // namespace thaw
