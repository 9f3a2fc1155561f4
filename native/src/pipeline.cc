#include "pipeline.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <xxhash.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>

#include "aligned_buffer.h"
#include "unique_fd.h"

namespace thaw {
namespace {

struct XxhStateDeleter {
  void operator()(XXH64_state_t* s) const { XXH64_freeState(s); }
};
using XxhState = std::unique_ptr<XXH64_state_t, XxhStateDeleter>;

uint64_t RoundUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// One stream while it has blocks queued or in flight.
struct Active {
  size_t index = 0;
  UniqueFd src;
  UniqueFd dst;
  uint64_t begin = 0;  // absolute offsets in src
  uint64_t end = 0;
  uint64_t next = 0;   // next offset to issue
  unsigned outstanding = 0;
  bool all_issued = false;
  XxhState hash;
};

enum class SlotState { kFree, kReading, kRead, kWriting };

struct Slot {
  SlotState state = SlotState::kFree;
  Active* stream = nullptr;
  uint64_t off = 0;      // absolute offset in src
  uint32_t len = 0;      // bytes wanted
  uint32_t io_len = 0;   // bytes asked of the kernel (len rounded up for O_DIRECT)
  uint32_t done = 0;     // bytes read (or written, while kWriting)
  uint8_t* data = nullptr;  // where the kernel reads into
  bool bounced = false;     // data is `own`, to be copied into caller memory
  AlignedBuffer own;
};

class Pipeline {
 public:
  Pipeline(const PipelineOptions& o, const std::vector<StreamSpec>& s, std::vector<StreamResult>* r)
      : opt_(o), specs_(s), results_(r) {}

  IoStatus Run();

 private:
  void Fail(int err, const char* op, const std::string& path, std::string detail = {}) {
    if (!status_.ok()) return;  // the first error wins
    status_.err = err;
    status_.op = op;
    status_.path = path;
    status_.detail = std::move(detail);
  }
  bool failed() const { return !status_.ok(); }
  bool Cancelled() const { return opt_.cancel != nullptr && __atomic_load_n(opt_.cancel, __ATOMIC_ACQUIRE) != 0; }

  bool OpenStream(size_t index);
  void IssueMore();
  bool SubmitRead(size_t slot_index);
  bool SubmitWrite(size_t slot_index);
  void Complete(const IoCompletion& c);
  void ConsumeHead();
  void Release(size_t slot_index);
  void Finish(Active* a);
  int64_t ApplyFaults(int64_t res);

  const PipelineOptions& opt_;
  const std::vector<StreamSpec>& specs_;
  std::vector<StreamResult>* results_;
  IoStatus status_;

  // Declared before queue_ so that the queue (which waits for in-flight I/O) is destroyed first.
  std::vector<Slot> slots_;
  std::vector<size_t> free_;
  std::deque<size_t> order_;  // slots in issue order, consumed (hashed/written) in that order
  std::vector<std::unique_ptr<Active>> active_;
  size_t next_stream_ = 0;
  Active* issuing_ = nullptr;
  uint64_t fault_bytes_ = 0;
  std::unique_ptr<IoQueue> queue_;
};

bool Pipeline::OpenStream(size_t index) {
  const StreamSpec& spec = specs_[index];
  auto a = std::make_unique<Active>();
  a->index = index;
  int flags = O_RDONLY | O_CLOEXEC | (opt_.direct ? O_DIRECT : 0);
  a->src.Reset(::open(spec.src.c_str(), flags));
  if (!a->src.valid()) {
    Fail(errno, "open", spec.src);
    return false;
  }
  struct stat st;
  if (::fstat(a->src.get(), &st) != 0) {
    Fail(errno, "fstat", spec.src);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    Fail(EINVAL, "stat", spec.src, "not a regular file");
    return false;
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  a->begin = spec.offset;
  if (spec.length < 0) {
    if (spec.offset > size) {
      Fail(EINVAL, "range", spec.src, "offset " + std::to_string(spec.offset) + " is past the end of the file");
      return false;
    }
    a->end = size;
  } else {
    a->end = spec.offset + static_cast<uint64_t>(spec.length);
    if (a->end > size) {
      Fail(kShortReadErrno, "read", spec.src,
           "range ends at byte " + std::to_string(a->end) + " but the file has " + std::to_string(size));
      return false;
    }
  }
  if (opt_.direct && a->begin % kDirectAlign != 0) {
    Fail(EINVAL, "range", spec.src, "O_DIRECT needs an offset aligned to 4096");
    return false;
  }
  if (spec.mem != nullptr && a->end - a->begin > spec.mem_len) {
    Fail(EINVAL, "range", spec.src,
         std::to_string(a->end - a->begin) + " bytes do not fit a buffer of " + std::to_string(spec.mem_len));
    return false;
  }
  if (!spec.dst.empty()) {
    a->dst.Reset(::open(spec.dst.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!a->dst.valid()) {
      Fail(errno, "open", spec.dst);
      return false;
    }
  }
  if (opt_.hash) {
    a->hash.reset(XXH64_createState());
    if (!a->hash || XXH64_reset(a->hash.get(), 0) != XXH_OK) {
      Fail(ENOMEM, "XXH64_reset", spec.src);
      return false;
    }
  }
  a->next = a->begin;
  (*results_)[index].offset = a->begin;
  issuing_ = a.get();
  active_[index] = std::move(a);
  return true;
}

void Pipeline::IssueMore() {
  while (!failed() && !free_.empty() && next_stream_ < specs_.size()) {
    if (issuing_ == nullptr && !OpenStream(next_stream_)) return;
    Active* a = issuing_;
    if (a->next >= a->end) {
      a->all_issued = true;
      issuing_ = nullptr;
      ++next_stream_;
      if (a->outstanding == 0) Finish(a);
      continue;
    }
    size_t si = free_.back();
    free_.pop_back();
    Slot& s = slots_[si];
    const StreamSpec& spec = specs_[a->index];
    uint64_t left = a->end - a->next;
    s.stream = a;
    s.off = a->next;
    s.len = static_cast<uint32_t>(left < opt_.block_size ? left : opt_.block_size);
    s.io_len = opt_.direct ? static_cast<uint32_t>(RoundUp(s.len, kDirectAlign)) : s.len;
    s.done = 0;
    s.bounced = false;
    if (spec.mem != nullptr) {
      // O_DIRECT tail: the kernel writes whole aligned blocks, more than the caller's memory holds;
      // unaligned memory (JS buffers usually are): O_DIRECT cannot read into it at all.
      bool unaligned = opt_.direct && reinterpret_cast<uintptr_t>(spec.mem) % kDirectAlign != 0;
      if (s.io_len > s.len || unaligned) {
        if (!s.own.allocated()) {
          int rc = s.own.Allocate(RoundUp(opt_.block_size, kDirectAlign), kDirectAlign);
          if (rc < 0) {
            Fail(-rc, "posix_memalign", spec.src);
            return;
          }
        }
        s.data = s.own.data();
        s.bounced = true;
      } else {
        s.data = spec.mem + (s.off - a->begin);
      }
    } else {
      s.data = s.own.data();
    }
    a->next += s.len;
    ++a->outstanding;
    order_.push_back(si);
    if (!SubmitRead(si)) return;
  }
}

bool Pipeline::SubmitRead(size_t si) {
  Slot& s = slots_[si];
  s.state = SlotState::kReading;
  IoRequest req{OpKind::kRead, s.stream->src.get(), s.data + s.done, s.io_len - s.done, s.off + s.done, si};
  int rc = queue_->Enqueue(req);
  if (rc < 0) {
    Fail(-rc, "submit", specs_[s.stream->index].src);
    return false;
  }
  return true;
}

bool Pipeline::SubmitWrite(size_t si) {
  Slot& s = slots_[si];
  s.state = SlotState::kWriting;
  IoRequest req{OpKind::kWrite, s.stream->dst.get(), s.data + s.done, s.len - s.done,
                s.off - s.stream->begin + s.done, si};
  int rc = queue_->Enqueue(req);
  if (rc < 0) {
    Fail(-rc, "submit", specs_[s.stream->index].dst);
    return false;
  }
  return true;
}

int64_t Pipeline::ApplyFaults(int64_t res) {
  const FaultSpec& f = opt_.faults;
  if (!f.enabled || res <= 0) return res;
  uint64_t n = static_cast<uint64_t>(res);
  if (fault_bytes_ + n > f.fail_after_bytes) {
    if (!f.short_read) return -(f.err != 0 ? f.err : EIO);
    n = f.fail_after_bytes > fault_bytes_ ? f.fail_after_bytes - fault_bytes_ : 0;
  }
  fault_bytes_ += n;
  return static_cast<int64_t>(n);
}

void Pipeline::Complete(const IoCompletion& c) {
  size_t si = static_cast<size_t>(c.tag);
  Slot& s = slots_[si];
  const StreamSpec& spec = specs_[s.stream->index];
  if (failed()) {
    // Draining after an error: nothing more is issued; the slot's data no longer matters.
    s.state = SlotState::kFree;
    return;
  }
  if (s.state == SlotState::kReading) {
    int64_t res = ApplyFaults(c.result);
    if (res == -EINTR || res == -EAGAIN) {
      SubmitRead(si);
      return;
    }
    if (res < 0) {
      Fail(static_cast<int>(-res), "read", spec.src, "at offset " + std::to_string(s.off + s.done));
      return;
    }
    if (res == 0) {
      Fail(kShortReadErrno, "read", spec.src,
           "short read: end of file at byte " + std::to_string(s.off + s.done) + ", expected " +
               std::to_string(s.stream->end));
      return;
    }
    uint64_t got = static_cast<uint64_t>(res);
    // Past the wanted length only when an O_DIRECT read of a rounded-up tail found more file.
    s.done = static_cast<uint32_t>(s.done + got > s.len ? s.len : s.done + got);
    if (s.done < s.len) {
      if (opt_.direct && (s.off + s.done) % kDirectAlign != 0) {
        Fail(kShortReadErrno, "read", spec.src,
             "short O_DIRECT read ending at unaligned byte " + std::to_string(s.off + s.done));
        return;
      }
      SubmitRead(si);
      return;
    }
    s.state = SlotState::kRead;
    return;
  }
  if (s.state == SlotState::kWriting) {
    if (c.result == -EINTR || c.result == -EAGAIN) {
      SubmitWrite(si);
      return;
    }
    if (c.result <= 0) {
      Fail(c.result < 0 ? static_cast<int>(-c.result) : EIO, "write", spec.dst,
           "at offset " + std::to_string(s.off - s.stream->begin + s.done));
      return;
    }
    s.done += static_cast<uint32_t>(c.result);
    if (s.done < s.len) {
      SubmitWrite(si);
      return;
    }
    Release(si);
    return;
  }
  Fail(EPROTO, "reap", spec.src, "completion for an idle slot");
}

void Pipeline::ConsumeHead() {
  while (!failed() && !order_.empty() && slots_[order_.front()].state == SlotState::kRead) {
    size_t si = order_.front();
    order_.pop_front();
    Slot& s = slots_[si];
    Active* a = s.stream;
    const StreamSpec& spec = specs_[a->index];
    if (a->hash) XXH64_update(a->hash.get(), s.data, s.len);
    if (s.bounced) std::memcpy(spec.mem + (s.off - a->begin), s.data, s.len);
    if (a->dst.valid()) {
      s.done = 0;
      SubmitWrite(si);
    } else {
      Release(si);
    }
  }
}

void Pipeline::Release(size_t si) {
  Slot& s = slots_[si];
  Active* a = s.stream;
  s.state = SlotState::kFree;
  s.stream = nullptr;
  free_.push_back(si);
  if (--a->outstanding == 0 && a->all_issued) Finish(a);
}

void Pipeline::Finish(Active* a) {
  StreamResult& r = (*results_)[a->index];
  r.bytes = a->end - a->begin;
  if (a->hash) {
    r.hashed = true;
    r.hash = XXH64_digest(a->hash.get());
  }
  if (a->dst.valid()) {
    int rc = a->dst.Close();
    if (rc < 0) Fail(-rc, "close", specs_[a->index].dst);
  }
  active_[a->index].reset();  // closes the source
}

IoStatus Pipeline::Run() {
  results_->assign(specs_.size(), StreamResult{});
  active_.resize(specs_.size());
  if (opt_.block_size == 0 || opt_.queue_depth == 0) {
    Fail(EINVAL, "options", "", "block size and queue depth must be positive");
    return status_;
  }
  if (opt_.direct && opt_.block_size % kDirectAlign != 0) {
    Fail(EINVAL, "options", "", "O_DIRECT needs a block size that is a multiple of 4096");
    return status_;
  }
  bool needs_own = false;
  for (const StreamSpec& spec : specs_) needs_own = needs_own || spec.mem == nullptr;
  slots_.resize(opt_.queue_depth);
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (needs_own) {
      int rc = slots_[i].own.Allocate(RoundUp(opt_.block_size, kDirectAlign), kDirectAlign);
      if (rc < 0) {
        Fail(-rc, "posix_memalign", "");
        return status_;
      }
    }
    free_.push_back(slots_.size() - 1 - i);  // hand out slot 0 first
  }
  int err = 0;
  queue_ = MakeIoQueue(opt_.backend, opt_.queue_depth, &err);
  if (!queue_) {
    Fail(-err, BackendSetupOp(opt_.backend), "");
    return status_;
  }

  std::vector<IoCompletion> done(opt_.queue_depth);
  for (;;) {
    if (!failed() && Cancelled()) Fail(ECANCELED, "cancel", "");
    if (!failed()) IssueMore();
    int rc = queue_->Flush();
    if (rc < 0) Fail(-rc, "submit", "");
    if (queue_->InFlight() == 0) break;  // done, or failed and drained
    int n = queue_->Reap(done.data(), static_cast<int>(done.size()));
    if (n < 0) {
      Fail(-n, "reap", "");
      break;  // destroying the queue waits for what is still in flight
    }
    for (int i = 0; i < n; ++i) Complete(done[static_cast<size_t>(i)]);
    ConsumeHead();
  }
  if (!failed() && (next_stream_ < specs_.size() || !order_.empty())) {
    Fail(EPROTO, "pipeline", "", "stopped with work left");
  }
  queue_.reset();
  return status_;
}

}  // namespace

IoStatus RunPipeline(const PipelineOptions& options, const std::vector<StreamSpec>& streams,
                     std::vector<StreamResult>* results) {
  Pipeline p(options, streams, results);
  return p.Run();
}

std::string FormatXxh64(uint64_t value) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016" PRIx64, value);
  return std::string(buf);
}

}  // namespace thaw
