// userfaultfd page server mechanics; see uffd.h for the protocol and the division of labour.
#include "uffd.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#define XXH_INLINE_ALL  // header-only: the addon needs no libxxhash at run time
#include <xxhash.h>

#include "unique_fd.h"

namespace thaw::uffd {
namespace {

using OwnedFd = thaw::UniqueFd;

struct FreeDeleter {
  void operator()(void* p) const { free(p); }
};
using AlignedBuffer = std::unique_ptr<char, FreeDeleter>;

AlignedBuffer AllocAligned(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kPageSize, std::max<size_t>(bytes, kPageSize)) != 0) return nullptr;
  return AlignedBuffer(static_cast<char*>(p));
}

// Reads exactly len bytes at offset; returns bytes read (< len only at end of file) or -errno.
ssize_t PreadFull(int fd, char* buf, size_t len, uint64_t offset) {
  size_t done = 0;
  while (done < len) {
    ssize_t rc = pread(fd, buf + done, len - done, static_cast<off_t>(offset + done));
    if (rc < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (rc == 0) break;
    done += static_cast<size_t>(rc);
  }
  return static_cast<ssize_t>(done);
}

std::string Sprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Sprintf(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

}  // namespace

int ReceiveMessage(int client_fd, int cancel_fd, int timeout_ms, LazyMessage* out) {
  *out = LazyMessage{};
  // The pid word (or the "restore finished" word).
  int32_t word = 0;
  size_t got = 0;
  double deadline = NowMs() + timeout_ms;
  while (got < sizeof word) {
    int left = std::max(0, static_cast<int>(deadline - NowMs()));
    int rc = WaitReadable(client_fd, cancel_fd, left);
    if (rc < 0) return rc;
    ssize_t n = recv(client_fd, reinterpret_cast<char*>(&word) + got, sizeof word - got, 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (n == 0) {
      if (got == 0) {
        out->kind = LazyMessage::kClosed;
        return 0;
      }
      return -EPROTO;  // connection closed inside a word
    }
    got += static_cast<size_t>(n);
  }
  if (static_cast<uint32_t>(word) == kRestoreFinished) {
    out->kind = LazyMessage::kFinished;
    return 0;
  }
  if (word < 0) {
    out->kind = LazyMessage::kZombie;
    out->pid = -word;
    return 0;
  }
  if (word == 0) return -EPROTO;
  out->pid = word;
  // One dummy byte carrying the task's userfaultfd.
  for (;;) {
    int left = std::max(0, static_cast<int>(deadline - NowMs()));
    int rc = WaitReadable(client_fd, cancel_fd, left);
    if (rc < 0) return rc;
    char byte = 0;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(client_fd, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (n == 0) return -EPROTO;
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    if (cm == nullptr || cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS ||
        cm->cmsg_len != CMSG_LEN(sizeof(int)) || (msg.msg_flags & MSG_CTRUNC)) {
      return -EPROTO;
    }
    memcpy(&out->uffd, CMSG_DATA(cm), sizeof(int));
    out->kind = LazyMessage::kTask;
    return 0;
  }
}

int HashFileXxh64(const std::string& path, int cancel_fd, std::string* hex, uint64_t* bytes, Failure* failure) {
  OwnedFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    *failure = {"open", errno, Sprintf("cannot open %s for hashing: %s", path.c_str(), strerror(errno))};
    return -1;
  }
  posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  constexpr size_t kBlock = 4 << 20;
  AlignedBuffer buf = AllocAligned(kBlock);
  XXH64_state_t* state = XXH64_createState();
  if (!buf || state == nullptr) {
    XXH64_freeState(state);
    *failure = {"alloc", ENOMEM, "cannot allocate a hash buffer"};
    return -1;
  }
  XXH64_reset(state, 0);
  uint64_t off = 0;
  for (;;) {
    if (cancel_fd >= 0) {
      pollfd p{cancel_fd, POLLIN, 0};
      if (poll(&p, 1, 0) > 0) {
        XXH64_freeState(state);
        *failure = {"hash", ECANCELED, "canceled"};
        return -1;
      }
    }
    ssize_t n = PreadFull(fd.get(), buf.get(), kBlock, off);
    if (n < 0) {
      XXH64_freeState(state);
      *failure = {"read", static_cast<int>(-n), Sprintf("hash read of %s failed: %s", path.c_str(), strerror(static_cast<int>(-n)))};
      return -1;
    }
    if (n == 0) break;
    XXH64_update(state, buf.get(), static_cast<size_t>(n));
    off += static_cast<uint64_t>(n);
    if (static_cast<size_t>(n) < kBlock) break;
  }
  *hex = Sprintf("%016llx", static_cast<unsigned long long>(XXH64_digest(state)));
  *bytes = off;
  XXH64_freeState(state);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The fill session.
//
// Locking: `rw_` orders page installation against the app's address-space events. Eager workers
// copy under the shared side; the event thread reads uffd messages, applies them (clears wanted
// bits, moves extents) and answers faults under the exclusive side. That closes the window in which
// a worker could install dump-time data after the app zapped the range (MADV_DONTNEED): a copy is
// either before the event was read — then the kernel had mmap_changing set and refused it with
// EAGAIN — or after the event was applied, when the pages are no longer wanted.
// Wanted bits (one per image page) are the single record of what is still to come; a page leaves
// the set exactly once (atomic fetch_and), which is what makes the counters exact.
namespace {

class Session;

struct Target {
  int uffd = -1;
  bool forked = false;
  std::atomic<bool> exited{false};
  std::vector<Extent> extents;         // by addr; changed only under the exclusive lock
  std::vector<uint32_t> by_page;       // extent indices sorted by first_page
  std::unique_ptr<std::atomic<uint64_t>[]> wanted;
  size_t words = 0;
  // One flag per chunk (index into the options' chunks): a chunk is processed once per target even
  // when a fault queued it again ahead of its turn — two workers must never copy the same pages.
  std::unique_ptr<std::atomic<uint8_t>[]> claimed;
  TargetStats stats;                   // plain counters: updated under the lock or at the end
  std::atomic<uint64_t> copied{0}, existing{0}, dropped{0}, vanished{0}, raced{0};

  void Reindex() {
    std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) { return a.addr < b.addr; });
    by_page.resize(extents.size());
    for (uint32_t i = 0; i < extents.size(); i++) by_page[i] = i;
    std::sort(by_page.begin(), by_page.end(),
              [this](uint32_t a, uint32_t b) { return extents[a].first_page < extents[b].first_page; });
  }

  bool IsWanted(uint64_t page) const {
    size_t w = page / 64;
    return w < words && (wanted[w].load(std::memory_order_relaxed) >> (page % 64)) & 1;
  }

  // Clears [first, first + n) and returns how many of those pages were still wanted.
  uint64_t Clear(uint64_t first, uint64_t n) {
    uint64_t cleared = 0;
    uint64_t end = first + n;
    for (uint64_t p = first; p < end;) {
      size_t w = p / 64;
      if (w >= words) break;
      unsigned bit = p % 64;
      uint64_t span = std::min<uint64_t>(64 - bit, end - p);
      uint64_t mask = (span == 64 ? ~0ull : ((1ull << span) - 1)) << bit;
      uint64_t old = wanted[w].fetch_and(~mask, std::memory_order_acq_rel);
      cleared += __builtin_popcountll(old & mask);
      p += span;
    }
    return cleared;
  }

  // Length of the run of wanted pages starting at `first`, at most `max`.
  uint64_t WantedRun(uint64_t first, uint64_t max) const {
    uint64_t n = 0;
    while (n < max && IsWanted(first + n)) n++;
    return n;
  }

  // First wanted page in [first, end), or end.
  uint64_t NextWanted(uint64_t first, uint64_t end) const {
    for (uint64_t p = first; p < end;) {
      size_t w = p / 64;
      if (w >= words) return end;
      uint64_t bits = wanted[w].load(std::memory_order_relaxed) >> (p % 64);
      if (bits != 0) return std::min(end, p + __builtin_ctzll(bits));
      p = (w + 1) * 64;
    }
    return end;
  }

  uint64_t CountWanted() const {
    uint64_t n = 0;
    for (size_t w = 0; w < words; w++) n += __builtin_popcountll(wanted[w].load(std::memory_order_relaxed));
    return n;
  }

  // The target address of image page `page` and how many pages from there stay in one extent.
  bool Translate(uint64_t page, uint64_t* addr, uint64_t* contiguous) const {
    auto it = std::upper_bound(by_page.begin(), by_page.end(), page,
                               [this](uint64_t p, uint32_t i) { return p < extents[i].first_page; });
    if (it == by_page.begin()) return false;
    const Extent& e = extents[*(it - 1)];
    if (page >= e.first_page + e.pages) return false;
    *addr = e.addr + (page - e.first_page) * kPageSize;
    *contiguous = e.first_page + e.pages - page;
    return true;
  }

  // The extent holding target address `addr`, or nullptr.
  const Extent* FindAddr(uint64_t addr) const {
    auto it = std::upper_bound(extents.begin(), extents.end(), addr,
                               [](uint64_t a, const Extent& e) { return a < e.addr; });
    if (it == extents.begin()) return nullptr;
    const Extent& e = *(it - 1);
    return addr < e.addr + e.pages * kPageSize ? &e : nullptr;
  }

  // Splits the extent that strictly contains page-aligned `addr` in two.
  void SplitAt(uint64_t addr) {
    for (size_t i = 0; i < extents.size(); i++) {
      Extent& e = extents[i];
      uint64_t end = e.addr + e.pages * kPageSize;
      if (addr > e.addr && addr < end) {
        uint64_t head = (addr - e.addr) / kPageSize;
        Extent tail{addr, e.first_page + head, e.pages - head};
        e.pages = head;
        extents.push_back(tail);
        return;
      }
    }
  }

  // Clears the wanted bits of every image page now mapped in [start, end); returns pages cleared.
  uint64_t ClearRange(uint64_t start, uint64_t end) {
    uint64_t cleared = 0;
    for (const Extent& e : extents) {
      uint64_t s = std::max(start, e.addr), t = std::min(end, e.addr + e.pages * kPageSize);
      if (s >= t) continue;
      cleared += Clear(e.first_page + (s - e.addr) / kPageSize, (t - s + kPageSize - 1) / kPageSize);
    }
    return cleared;
  }
};

struct Job {
  Target* target;
  uint32_t chunk;  // index into the options' chunks
};

struct PendingFault {
  Target* target;
  uint64_t addr;
  double read_at_ms;
};

// A fault that needs image data: read outside the exclusive lock, copied under the shared one.
struct FaultCopy {
  Target* target;
  uint64_t page;
  uint64_t pages;
  double read_at_ms;
};

enum class CopyOutcome { kDone, kAgain, kExited, kFailed };

class Session {
 public:
  Session(const FillOptions& o, FillResult* r) : opt_(o), res_(r) {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    // Writers first: the event thread must not starve behind a stream of eager copies.
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&rw_, &attr);
    pthread_rwlockattr_destroy(&attr);
  }
  ~Session() { pthread_rwlock_destroy(&rw_); }

  void Run();

 private:
  void Fail(const std::string& op, int err, const std::string& message) {
    std::lock_guard<std::mutex> g(fail_mu_);
    if (!res_->failure.failed()) res_->failure = {op, err, message};
    failed_.store(true);
    Wake();
  }
  void Wake() {
    uint64_t one = 1;
    ssize_t ignored = write(wake_fd_.get(), &one, sizeof one);
    (void)ignored;
  }
  bool Stopping() const { return failed_.load() || canceled_.load(); }

  void Worker();
  void ProcessJob(const Job& job, char* buf);
  CopyOutcome CopyPages(Target* t, uint64_t* pos, uint64_t end, uint64_t buf_first, const char* buf, uint64_t* copied);
  // Exclusive lock held: answers what needs no data at once. Returns 0 (answered), 1 (*copy must be
  // read and copied), -1 (an event is pending: again).
  int TriageFault(const PendingFault& f, FaultCopy* copy);
  // No lock held: reads and copies. Returns false when an event is pending (again).
  bool CopyFault(const FaultCopy& c);
  void ReadEvents(Target* t, std::vector<std::unique_ptr<Target>>* born);
  void ApplyRemap(Target* t, uint64_t from, uint64_t to, uint64_t len);
  void ApplyUnmap(Target* t, uint64_t start, uint64_t end);
  std::unique_ptr<Target> Fork(Target* parent, int child_uffd);
  void EnqueueAll(Target* t);
  void Follow(Target* t, uint64_t page);
  bool AllIdle();

  const FillOptions& opt_;
  FillResult* res_;
  pthread_rwlock_t rw_;
  OwnedFd fill_fd_, fault_fd_, wake_fd_, stop_fd_;
  std::vector<std::unique_ptr<Target>> targets_;  // [0] is the task CRIU sent; forks follow
  std::mutex fail_mu_;
  std::atomic<bool> failed_{false}, canceled_{false}, stop_{false};
  std::atomic<uint64_t> bytes_read_{0};
  bool prefetch_ = false;

  std::mutex q_mu_;
  std::condition_variable q_cv_;
  std::deque<Job> queue_;
  int idle_ = 0;
  int workers_ = 0;

  bool started_ = false;  // the eager fill may run (start_fd was readable)
  std::vector<PendingFault> faults_;
  std::vector<FaultCopy> fault_copies_;
  std::vector<uint32_t> by_first_page_;  // chunk indices in memory (image page) order
  AlignedBuffer fault_buf_;
  uint64_t max_chunk_pages_ = 1;
  uint64_t max_page_ = 0;
  double fault_wait_max_ms_ = 0;
};

CopyOutcome Session::CopyPages(Target* t, uint64_t* pos, uint64_t end, uint64_t buf_first, const char* buf,
                               uint64_t* copied) {
  uint64_t cap = UINT64_MAX;
  while (*pos < end) {
    if (t->exited.load()) return CopyOutcome::kExited;
    uint64_t p = t->NextWanted(*pos, end);
    if (p >= end) {
      *pos = end;
      break;
    }
    *pos = p;
    uint64_t run = t->WantedRun(p, end - p);
    // Another thread (a fault copy beside a worker) may have installed page p since NextWanted saw
    // it: bits are only ever cleared, so look again from p (a copy of 0 pages is EINVAL).
    if (run == 0) continue;
    uint64_t addr = 0, contiguous = 0;
    if (!t->Translate(p, &addr, &contiguous)) {
      // No extent holds the page any more (its range was unmapped): nothing to install.
      t->vanished += t->Clear(p, 1);
      *pos = p + 1;
      continue;
    }
    run = std::min({run, contiguous, cap});
    uffdio_copy c{};
    c.dst = addr;
    c.src = reinterpret_cast<uint64_t>(buf + (p - buf_first) * kPageSize);
    c.len = run * kPageSize;
    c.mode = 0;  // wake anything waiting in the range
    c.copy = 0;
    if (ioctl(t->uffd, UFFDIO_COPY, &c) == 0) {
      uint64_t n = t->Clear(p, run);
      t->copied += n;
      *copied += n;
      *pos = p + run;
      cap = UINT64_MAX;
      continue;
    }
    int err = errno;
    if (c.copy > 0) {  // partial: keep what landed, the rest tells its own error next round
      uint64_t k = static_cast<uint64_t>(c.copy) / kPageSize;
      uint64_t n = t->Clear(p, k);
      t->copied += n;
      *copied += n;
      *pos = p + k;
      continue;
    }
    switch (err) {
      case EAGAIN:  // an address-space event is pending: the event thread must read it first
        return CopyOutcome::kAgain;
      case EEXIST:
        // A fork child holds its parent's pages: those count as existing. Otherwise another of our
        // threads (a fault and a worker on the same pages) installed it and clears its bit itself.
        if (t->forked) {
          t->existing += t->Clear(p, 1);
        } else {
          t->raced++;
        }
        *pos = p + 1;
        break;
      case ENOENT:  // the range is not one registered VMA (split by mprotect, or gone): go smaller
        if (run > 1) {
          cap = std::max<uint64_t>(1, run / 2);
        } else {
          t->vanished += t->Clear(p, 1);
          *pos = p + 1;
          cap = UINT64_MAX;
        }
        break;
      case ESRCH:
      case ENOSPC:  // the target's mm is gone
        t->exited.store(true);
        return CopyOutcome::kExited;
      default:
        Fail("UFFDIO_COPY", err,
             Sprintf("UFFDIO_COPY of %llu pages at 0x%llx failed: %s", static_cast<unsigned long long>(run),
                     static_cast<unsigned long long>(addr), strerror(err)));
        return CopyOutcome::kFailed;
    }
  }
  return CopyOutcome::kDone;
}

void Session::ProcessJob(const Job& job, char* buf) {
  Target* t = job.target;
  if (t->claimed[job.chunk].exchange(1)) return;  // already done (or being done) by someone else
  const Chunk& chunk = opt_.chunks[job.chunk];
  const uint64_t first = chunk.first_page, end = first + chunk.pages;
  if (t->exited.load() || t->NextWanted(first, end) >= end) return;
  ssize_t n = PreadFull(fill_fd_.get(), buf, chunk.pages * kPageSize, first * kPageSize);
  if (n < 0) {
    Fail("read", static_cast<int>(-n),
         Sprintf("read of %s at %llu failed: %s", opt_.pages_path.c_str(),
                 static_cast<unsigned long long>(first * kPageSize), strerror(static_cast<int>(-n))));
    return;
  }
  bytes_read_ += static_cast<uint64_t>(n);
  if (static_cast<uint64_t>(n) < chunk.pages * kPageSize) {
    Fail("read", 0,
         Sprintf("short read: %s ends at %llu, image pages %llu-%llu need %llu bytes", opt_.pages_path.c_str(),
                 static_cast<unsigned long long>(first * kPageSize + n), static_cast<unsigned long long>(first),
                 static_cast<unsigned long long>(end - 1), static_cast<unsigned long long>(end * kPageSize)));
    return;
  }
  uint64_t pos = first, copied = 0;
  int backoff = 0;
  while (!Stopping()) {
    pthread_rwlock_rdlock(&rw_);
    CopyOutcome out = CopyPages(t, &pos, end, first, buf, &copied);
    pthread_rwlock_unlock(&rw_);
    if (out != CopyOutcome::kAgain) break;
    // Let the event thread take the exclusive side and read the pending event.
    if (backoff++ < 8) {
      sched_yield();
    } else {
      usleep(50);
    }
  }
}

void Session::Worker() {
  AlignedBuffer buf = AllocAligned(max_chunk_pages_ * kPageSize);
  if (!buf) {
    Fail("alloc", ENOMEM, "cannot allocate a fill buffer");
    return;
  }
  for (;;) {
    Job job{};
    const Chunk* ahead = nullptr;
    {
      std::unique_lock<std::mutex> g(q_mu_);
      while (queue_.empty() && !stop_.load()) {
        idle_++;
        if (idle_ == workers_) Wake();
        q_cv_.wait(g);
        idle_--;
      }
      if (stop_.load()) return;
      job = queue_.front();
      queue_.pop_front();
      if (prefetch_ && opt_.prefetch_chunks > 0 && queue_.size() >= opt_.prefetch_chunks) {
        ahead = &opt_.chunks[queue_[opt_.prefetch_chunks - 1].chunk];
      }
    }
    // Start the disk read of a chunk further down the queue, so its I/O overlaps this copy.
    if (ahead != nullptr) {
      posix_fadvise(fill_fd_.get(), static_cast<off_t>(ahead->first_page * kPageSize),
                    static_cast<off_t>(ahead->pages * kPageSize), POSIX_FADV_WILLNEED);
    }
    if (!Stopping()) ProcessJob(job, buf.get());
  }
}

bool Session::AllIdle() {
  std::lock_guard<std::mutex> g(q_mu_);
  return queue_.empty() && idle_ == workers_;
}

void Session::EnqueueAll(Target* t) {
  {
    std::lock_guard<std::mutex> g(q_mu_);
    for (uint32_t i = 0; i < opt_.chunks.size(); i++) queue_.push_back({t, i});
  }
  q_cv_.notify_all();
}

// A fault says where the app reads now: the chunks that follow it in memory go to the front of the
// queue, so the eager fill runs just ahead of a sequential reader (the CUDA restore reading parked
// device memory) instead of wherever the fill order happened to be.
void Session::Follow(Target* t, uint64_t page) {
  if (!started_ || opt_.follow_chunks == 0 || by_first_page_.empty()) return;
  auto it = std::upper_bound(by_first_page_.begin(), by_first_page_.end(), page,
                             [this](uint64_t p, uint32_t i) { return p < opt_.chunks[i].first_page; });
  if (it == by_first_page_.begin()) return;
  size_t pos = static_cast<size_t>(it - by_first_page_.begin()) - 1;  // the chunk holding `page`
  size_t end = std::min(by_first_page_.size(), pos + 1 + opt_.follow_chunks);
  {
    std::lock_guard<std::mutex> g(q_mu_);
    for (size_t k = end; k-- > pos;) {
      uint32_t c = by_first_page_[k];
      if (!t->claimed[c].load(std::memory_order_relaxed)) queue_.push_front({t, c});
    }
  }
  q_cv_.notify_all();
}

int Session::TriageFault(const PendingFault& f, FaultCopy* copy) {
  Target* t = f.target;
  if (t->exited.load()) return 0;
  const uint64_t page_addr = f.addr & ~(kPageSize - 1);
  const Extent* e = t->FindAddr(page_addr);
  if (e != nullptr) {
    uint64_t p = e->first_page + (page_addr - e->addr) / kPageSize;
    if (t->IsWanted(p)) {
      uint64_t limit = std::min<uint64_t>(1 + opt_.fault_ahead_pages, e->first_page + e->pages - p);
      *copy = {t, p, std::max<uint64_t>(1, t->WantedRun(p, limit)), f.read_at_ms};
      return 1;
    }
  }
  // Not an image page (never dumped, or dropped by the app): the kernel's zero page, as CRIU does.
  uffdio_zeropage z{};
  z.range.start = page_addr;
  z.range.len = kPageSize;
  z.mode = 0;
  if (ioctl(t->uffd, UFFDIO_ZEROPAGE, &z) == 0) {
    t->stats.zero_pages++;
    return 0;
  }
  int err = errno;
  switch (err) {
    case EAGAIN:
      return -1;
    case EEXIST:
    case ENOENT: {  // already there, or no longer ours: just let the faulting thread retry
      uffdio_range r{page_addr, kPageSize};
      ioctl(t->uffd, UFFDIO_WAKE, &r);
      return 0;
    }
    case ESRCH:
    case ENOSPC:
      t->exited.store(true);
      return 0;
    default:
      Fail("UFFDIO_ZEROPAGE", err,
           Sprintf("UFFDIO_ZEROPAGE at 0x%llx failed: %s", static_cast<unsigned long long>(page_addr), strerror(err)));
      return 0;
  }
}

bool Session::CopyFault(const FaultCopy& c) {
  Target* t = c.target;
  if (t->exited.load() || t->NextWanted(c.page, c.page + c.pages) >= c.page + c.pages) return true;
  ssize_t got = PreadFull(fault_fd_.get(), fault_buf_.get(), c.pages * kPageSize, c.page * kPageSize);
  if (got < 0 || static_cast<uint64_t>(got) < c.pages * kPageSize) {
    Fail("read", got < 0 ? static_cast<int>(-got) : 0,
         Sprintf("fault read of %s at %llu failed: %s", opt_.pages_path.c_str(),
                 static_cast<unsigned long long>(c.page * kPageSize), got < 0 ? strerror(static_cast<int>(-got)) : "short read"));
    return true;
  }
  bytes_read_ += static_cast<uint64_t>(got);
  uint64_t pos = c.page, copied = 0;
  pthread_rwlock_rdlock(&rw_);
  CopyOutcome out = CopyPages(t, &pos, c.page + c.pages, c.page, fault_buf_.get(), &copied);
  pthread_rwlock_unlock(&rw_);
  t->stats.fault_pages_copied += copied;
  if (copied > 0) Follow(t, c.page);
  return out != CopyOutcome::kAgain;
}

void Session::ApplyRemap(Target* t, uint64_t from, uint64_t to, uint64_t len) {
  t->SplitAt(from);
  t->SplitAt(from + len);
  for (Extent& e : t->extents) {
    if (e.addr >= from && e.addr < from + len) e.addr = e.addr - from + to;
  }
  t->Reindex();
}

void Session::ApplyUnmap(Target* t, uint64_t start, uint64_t end) {
  t->dropped += t->ClearRange(start, end);
  t->SplitAt(start);
  t->SplitAt(end);
  t->extents.erase(std::remove_if(t->extents.begin(), t->extents.end(),
                                  [&](const Extent& e) { return e.addr >= start && e.addr < end; }),
                   t->extents.end());
  t->Reindex();
}

std::unique_ptr<Target> Session::Fork(Target* parent, int child_uffd) {
  auto child = std::make_unique<Target>();
  child->uffd = child_uffd;
  child->forked = true;
  child->extents = parent->extents;
  child->words = parent->words;
  child->wanted.reset(new std::atomic<uint64_t>[child->words]);
  for (size_t w = 0; w < child->words; w++) child->wanted[w].store(parent->wanted[w].load());
  child->claimed.reset(new std::atomic<uint8_t>[std::max<size_t>(1, opt_.chunks.size())]);
  for (size_t i = 0; i < opt_.chunks.size(); i++) child->claimed[i].store(0);
  child->stats.total_pages = child->CountWanted();
  child->Reindex();
  int flags = fcntl(child_uffd, F_GETFL);
  if (flags >= 0) fcntl(child_uffd, F_SETFL, flags | O_NONBLOCK);
  return child;
}

void Session::ReadEvents(Target* t, std::vector<std::unique_ptr<Target>>* born) {
  uffd_msg msgs[32];
  for (;;) {
    ssize_t n = read(t->uffd, msgs, sizeof msgs);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return;
      Fail("read", errno, Sprintf("reading userfaultfd events failed: %s", strerror(errno)));
      return;
    }
    if (n == 0 || n % sizeof(uffd_msg) != 0) {
      Fail("read", EPROTO, "short userfaultfd message");
      return;
    }
    double now = NowMs();
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); i++) {
      const uffd_msg& m = msgs[i];
      switch (m.event) {
        case UFFD_EVENT_PAGEFAULT:
          t->stats.faults++;
          faults_.push_back({t, m.arg.pagefault.address, now});
          break;
        case UFFD_EVENT_FORK:
          t->stats.events_fork++;
          born->push_back(Fork(t, static_cast<int>(m.arg.fork.ufd)));
          break;
        case UFFD_EVENT_REMAP:
          t->stats.events_remap++;
          ApplyRemap(t, m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
          break;
        case UFFD_EVENT_REMOVE:
          // MADV_DONTNEED/REMOVE: the range reads as zeros from now on, so its dump-time data must
          // not arrive later. The VMA stays registered; its faults get the zero page.
          t->stats.events_remove++;
          t->dropped += t->ClearRange(m.arg.remove.start, m.arg.remove.end);
          break;
        case UFFD_EVENT_UNMAP:
          t->stats.events_unmap++;
          ApplyUnmap(t, m.arg.remove.start, m.arg.remove.end);
          break;
        default:
          Fail("event", EPROTO, Sprintf("unexpected userfaultfd event %u", static_cast<unsigned>(m.event)));
          return;
      }
    }
    if (static_cast<size_t>(n) < sizeof msgs) return;
  }
}

void Session::Run() {
  const double t0 = NowMs();
  int flags = O_RDONLY | O_CLOEXEC | (opt_.direct ? O_DIRECT : 0);
  fill_fd_.Reset(open(opt_.pages_path.c_str(), flags));
  if (fill_fd_.get() < 0) {
    res_->failure = {"open", errno, Sprintf("cannot open %s: %s", opt_.pages_path.c_str(), strerror(errno))};
    return;
  }
  fault_fd_.Reset(open(opt_.pages_path.c_str(), O_RDONLY | O_CLOEXEC));
  wake_fd_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  stop_fd_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (fault_fd_.get() < 0 || wake_fd_.get() < 0 || stop_fd_.get() < 0) {
    res_->failure = {"open", errno, Sprintf("cannot open descriptors: %s", strerror(errno))};
    return;
  }
  if (!opt_.direct) posix_fadvise(fill_fd_.get(), 0, 0, POSIX_FADV_SEQUENTIAL);

  // The first target: wanted = every page of every chunk.
  for (const Chunk& c : opt_.chunks) {
    max_chunk_pages_ = std::max(max_chunk_pages_, c.pages);
    max_page_ = std::max(max_page_, c.first_page + c.pages);
  }
  for (const Extent& e : opt_.extents) max_page_ = std::max(max_page_, e.first_page + e.pages);
  auto first = std::make_unique<Target>();
  first->uffd = opt_.uffd;
  first->extents = opt_.extents;
  first->words = (max_page_ + 63) / 64;
  first->wanted.reset(new std::atomic<uint64_t>[std::max<size_t>(1, first->words)]);
  for (size_t w = 0; w < first->words; w++) first->wanted[w].store(0);
  for (const Chunk& c : opt_.chunks) {
    for (uint64_t p = c.first_page; p < c.first_page + c.pages; p++) {
      first->wanted[p / 64].fetch_or(1ull << (p % 64));
    }
  }
  first->stats.total_pages = first->CountWanted();
  first->Reindex();
  first->claimed.reset(new std::atomic<uint8_t>[std::max<size_t>(1, opt_.chunks.size())]);
  for (size_t i = 0; i < opt_.chunks.size(); i++) first->claimed[i].store(0);
  by_first_page_.resize(opt_.chunks.size());
  for (uint32_t i = 0; i < by_first_page_.size(); i++) by_first_page_[i] = i;
  std::sort(by_first_page_.begin(), by_first_page_.end(),
            [this](uint32_t a, uint32_t b) { return opt_.chunks[a].first_page < opt_.chunks[b].first_page; });
  prefetch_ = !opt_.direct;
  {
    int fl = fcntl(first->uffd, F_GETFL);
    if (fl < 0 || fcntl(first->uffd, F_SETFL, fl | O_NONBLOCK) < 0) {
      res_->failure = {"fcntl", errno, Sprintf("the userfaultfd is not usable: %s", strerror(errno))};
      return;
    }
  }
  fault_buf_ = AllocAligned((1 + opt_.fault_ahead_pages) * kPageSize);
  if (!fault_buf_) {
    res_->failure = {"alloc", ENOMEM, "cannot allocate the fault buffer"};
    return;
  }
  targets_.push_back(std::move(first));
  started_ = opt_.start_fd < 0;
  if (started_) {
    res_->start_ms = 0;
    EnqueueAll(targets_[0].get());
  }

  std::thread hasher;
  if (opt_.hash) {
    hasher = std::thread([this] {
      Failure f;
      if (HashFileXxh64(opt_.pages_path, stop_fd_.get(), &res_->hash_hex, &res_->hashed_bytes, &f) != 0 &&
          f.err != ECANCELED) {
        Fail(f.op, f.err, f.message);
      }
    });
  }
  workers_ = std::max(1, opt_.threads);
  std::vector<std::thread> pool;
  for (int i = 0; i < workers_; i++) pool.emplace_back([this] { Worker(); });

  // The event thread: faults first, address-space events, completion.
  std::vector<pollfd> fds;
  for (;;) {
    if (failed_.load()) break;
    if (started_ && faults_.empty() && fault_copies_.empty() && AllIdle()) break;  // all done, nothing waiting
    fds.clear();
    for (auto& t : targets_) {
      if (!t->exited.load()) fds.push_back({t->uffd, POLLIN, 0});
    }
    fds.push_back({wake_fd_.get(), POLLIN, 0});
    const size_t start_slot = fds.size();
    if (!started_) fds.push_back({opt_.start_fd, POLLIN, 0});
    if (opt_.cancel_fd >= 0) fds.push_back({opt_.cancel_fd, POLLIN, 0});
    int rc = poll(fds.data(), fds.size(), faults_.empty() && fault_copies_.empty() ? 100 : 1);
    if (rc < 0 && errno != EINTR) {
      Fail("poll", errno, Sprintf("poll failed: %s", strerror(errno)));
      break;
    }
    if (opt_.cancel_fd >= 0 && (fds.back().revents & POLLIN)) {
      canceled_.store(true);
      break;
    }
    uint64_t drain;
    while (read(wake_fd_.get(), &drain, sizeof drain) > 0) {
    }
    if (!started_ && (fds[start_slot].revents & POLLIN)) {  // never drained: one signal opens every fill
      started_ = true;
      res_->start_ms = NowMs() - t0;
      for (auto& t : targets_) EnqueueAll(t.get());
    }
    std::vector<std::unique_ptr<Target>> born;
    pthread_rwlock_wrlock(&rw_);
    size_t ntargets = targets_.size();
    for (size_t i = 0; i < ntargets && !failed_.load(); i++) {
      if (!targets_[i]->exited.load()) ReadEvents(targets_[i].get(), &born);
    }
    std::vector<PendingFault> again;
    for (const PendingFault& f : faults_) {
      if (failed_.load()) break;
      FaultCopy c;
      int r = TriageFault(f, &c);
      if (r < 0) {
        again.push_back(f);
      } else if (r > 0) {
        fault_copies_.push_back(c);
      } else {
        fault_wait_max_ms_ = std::max(fault_wait_max_ms_, NowMs() - f.read_at_ms);
      }
    }
    faults_.swap(again);
    pthread_rwlock_unlock(&rw_);
    // Faults that need data: read with no lock held (a cold read takes milliseconds, and the eager
    // workers keep copying meanwhile), copy under the shared side like a worker.
    std::vector<FaultCopy> copies_again;
    for (const FaultCopy& c : fault_copies_) {
      if (failed_.load()) break;
      if (!CopyFault(c)) {
        copies_again.push_back(c);
      } else {
        fault_wait_max_ms_ = std::max(fault_wait_max_ms_, NowMs() - c.read_at_ms);
      }
    }
    fault_copies_.swap(copies_again);
    for (auto& c : born) {
      targets_.push_back(std::move(c));
      if (started_) EnqueueAll(targets_.back().get());
    }
  }

  stop_.store(true);
  q_cv_.notify_all();
  if (failed_.load() || canceled_.load()) SignalCancel(stop_fd_.get());  // the hash is moot now
  for (auto& th : pool) th.join();
  if (!failed_.load() && !canceled_.load()) {
    for (auto& t : targets_) {
      uint64_t left = t->exited.load() ? 0 : t->CountWanted();
      if (left != 0) {
        Fail("fill", EIO, Sprintf("%llu pages were never installed", static_cast<unsigned long long>(left)));
        break;
      }
    }
  }
  const bool ok = !failed_.load() && !canceled_.load();
  // Closing a userfaultfd unregisters its ranges: from then on a missing page reads as zeros. That
  // is right only once every image page is in; on failure the caller kills the target first.
  for (auto& t : targets_) {
    TargetStats s = t->stats;
    s.uffd = t->uffd;
    s.forked = t->forked;
    s.exited = t->exited.load();
    s.pages_copied = t->copied.load();
    s.pages_existing = t->existing.load();
    s.pages_dropped = t->dropped.load();
    s.pages_vanished = t->vanished.load();
    s.pages_raced = t->raced.load();
    s.pages_left = t->CountWanted();
    if (ok && opt_.close_when_filled) {
      ::close(t->uffd);
      s.closed_fd = true;
    }
    res_->targets.push_back(s);
  }
  res_->fill_ms = NowMs() - t0;
  if (hasher.joinable()) hasher.join();
  res_->canceled = canceled_.load();
  res_->bytes_read = bytes_read_.load();
  res_->fault_wait_max_us = fault_wait_max_ms_ * 1000;
  res_->duration_ms = NowMs() - t0;
}

}  // namespace

void RunFill(const FillOptions& options, FillResult* result) {
  Session s(options, result);
  s.Run();
}

}  // namespace thaw::uffd
