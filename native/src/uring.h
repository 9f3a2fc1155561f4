// IoQueue over io_uring (liburing 2.3: no IO_URING_VERSION_* macros, so only 2.3-era calls are used).
#pragma once

#include <liburing.h>

#include "io_queue.h"

namespace thaw {

class UringQueue final : public IoQueue {
 public:
  // Returns null and sets *err to -errno when the ring cannot be set up (-EPERM/-ENOSYS: refused).
  static std::unique_ptr<UringQueue> Create(unsigned depth, int* err);
  ~UringQueue() override;
  UringQueue(const UringQueue&) = delete;
  UringQueue& operator=(const UringQueue&) = delete;

  int Enqueue(const IoRequest& req) override;
  int Flush() override;
  int Reap(IoCompletion* out, int max) override;
  unsigned InFlight() const override { return in_flight_; }

 private:
  UringQueue() = default;
  io_uring ring_{};
  unsigned queued_ = 0;     // SQEs prepared, not yet submitted
  unsigned in_flight_ = 0;  // submitted, CQE not yet reaped
};

}  // namespace thaw
