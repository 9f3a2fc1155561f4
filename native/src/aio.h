// IoQueue over Linux native AIO (io_submit via libaio). Truly asynchronous only with O_DIRECT; on a
// buffered fd the kernel does the read inside io_submit, so it behaves like a synchronous pread.
#pragma once

#include <libaio.h>

#include <vector>

#include "io_queue.h"

namespace thaw {

class AioQueue final : public IoQueue {
 public:
  static std::unique_ptr<AioQueue> Create(unsigned depth, int* err);
  ~AioQueue() override;
  AioQueue(const AioQueue&) = delete;
  AioQueue& operator=(const AioQueue&) = delete;

  int Enqueue(const IoRequest& req) override;
  int Flush() override;
  int Reap(IoCompletion* out, int max) override;
  unsigned InFlight() const override { return in_flight_; }

 private:
  AioQueue() = default;
  io_context_t ctx_ = nullptr;
  std::vector<iocb> pending_;
  std::vector<iocb*> pending_ptrs_;
  std::vector<io_event> events_;
  unsigned in_flight_ = 0;
};

}  // namespace thaw
