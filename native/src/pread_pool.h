// IoQueue over plain pread/pwrite on a small pool of threads, one per request in flight. Works
// wherever the kernel interfaces above are refused.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "io_queue.h"

namespace thaw {

class PreadQueue final : public IoQueue {
 public:
  static std::unique_ptr<PreadQueue> Create(unsigned threads, int* err);
  ~PreadQueue() override;
  PreadQueue(const PreadQueue&) = delete;
  PreadQueue& operator=(const PreadQueue&) = delete;

  int Enqueue(const IoRequest& req) override;
  int Flush() override;
  int Reap(IoCompletion* out, int max) override;
  unsigned InFlight() const override { return in_flight_; }

 private:
  PreadQueue() = default;
  void Work();
  void Stop();

  std::vector<IoRequest> pending_;  // owner thread only
  unsigned in_flight_ = 0;          // owner thread only

  // Guarded by mu_: jobs_, done_, stop_.
  std::mutex mu_;
  std::condition_variable jobs_cv_;
  std::condition_variable done_cv_;
  std::deque<IoRequest> jobs_;
  std::vector<IoCompletion> done_;
  bool stop_ = false;

  std::vector<std::thread> threads_;
};

}  // namespace thaw
