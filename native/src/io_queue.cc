#include "io_queue.h"

namespace thaw {

std::unique_ptr<IoQueue> MakeIoQueue(Backend backend, unsigned depth, int* err) {
  switch (backend) {
    case Backend::kUring:
      return MakeUringQueue(depth, err);
    case Backend::kAio:
      return MakeAioQueue(depth, err);
    case Backend::kPread:
      return MakePreadQueue(depth, err);
  }
  *err = -22;  // EINVAL
  return nullptr;
}

const char* BackendName(Backend backend) {
  switch (backend) {
    case Backend::kUring:
      return "uring";
    case Backend::kAio:
      return "aio";
    case Backend::kPread:
      return "pread";
  }
  return "?";
}

const char* BackendSetupOp(Backend backend) {
  switch (backend) {
    case Backend::kUring:
      return "io_uring_queue_init";
    case Backend::kAio:
      return "io_setup";
    case Backend::kPread:
      return "pthread_create";
  }
  return "?";
}

}  // namespace thaw
