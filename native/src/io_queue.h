// The one seam between the copy/hash pipeline and the kernel interfaces: a queue of positional reads
// and writes that complete in any order. io_uring, Linux AIO and a pread thread pool implement it.
// No N-API here: this code runs on worker threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace thaw {

enum class OpKind : uint8_t { kRead, kWrite };

struct IoRequest {
  OpKind kind;
  int fd;
  void* buf;
  size_t len;
  uint64_t offset;
  uint64_t tag;
};

struct IoCompletion {
  uint64_t tag;
  int64_t result;  // bytes transferred, or -errno
};

// Used by one thread at a time.
class IoQueue {
 public:
  virtual ~IoQueue() = default;
  // Queues a request; it reaches the kernel (or a worker thread) at the next Flush(). 0 or -errno.
  virtual int Enqueue(const IoRequest& req) = 0;
  // Hands every queued request over. 0 or -errno; requests not handed over are dropped.
  virtual int Flush() = 0;
  // Blocks until at least one handed-over request completes. Returns the number written to out, or -errno.
  virtual int Reap(IoCompletion* out, int max) = 0;
  // Requests handed over and not yet reaped.
  virtual unsigned InFlight() const = 0;
  // Destroying a queue waits for (or cancels) requests still in flight, so their buffers may be freed after.
};

enum class Backend { kUring, kAio, kPread };

// A queue for up to `depth` requests in flight. On failure returns null and sets *err to -errno; for
// io_uring, -EPERM / -ENOSYS mean the kernel refuses io_uring here (disabled by sysctl, seccomp, or absent).
std::unique_ptr<IoQueue> MakeIoQueue(Backend backend, unsigned depth, int* err);

std::unique_ptr<IoQueue> MakeUringQueue(unsigned depth, int* err);
std::unique_ptr<IoQueue> MakeAioQueue(unsigned depth, int* err);
std::unique_ptr<IoQueue> MakePreadQueue(unsigned depth, int* err);

const char* BackendName(Backend backend);
// The syscall that creates a backend's queue (the `op` of its set-up errors).
const char* BackendSetupOp(Backend backend);

}  // namespace thaw
