// userfaultfd page server mechanics for CRIU's lazy-pages protocol (no N-API here).
//
// CRIU's `restore --lazy-pages` connects to <work dir>/lazy-pages.socket and, per restored task,
// sends the task's pid (a native int) followed by one byte carrying the task's userfaultfd
// (SCM_RIGHTS); a zombie is a negative pid without a descriptor; the end of the restore is the
// u32 0x52535446. The restorer registers every lazy anonymous VMA with UFFDIO_REGISTER_MODE_MISSING,
// so a page of such a VMA appears only through UFFDIO_COPY / UFFDIO_ZEROPAGE from the holder of
// the userfaultfd — which is what makes "every page exactly once" checkable here.
//
// FillSession fills one task's lazy pages from its pages-*.img with several threads and answers
// page faults first. All decisions (chunking, order, thread count, verification, what to do on
// failure) come from the caller; this file only moves bytes and keeps the kernel's rules.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "unix_socket.h"  // ListenUnix, AcceptClient, CreateCancelFd, SignalCancel, WaitReadable

namespace thaw::uffd {

constexpr uint64_t kPageSize = 4096;
// CRIU's "restore finished" word (criu/uffd.c: LAZY_PAGES_RESTORE_FINISHED).
constexpr uint32_t kRestoreFinished = 0x52535446;

// A failure: which step, errno (0 when not an OS error) and a sentence for people.
struct Failure {
  std::string op;
  int err = 0;
  std::string message;
  bool failed() const { return !op.empty(); }
};

struct LazyMessage {
  enum Kind { kTask, kZombie, kFinished, kClosed } kind = kClosed;
  int pid = 0;
  int uffd = -1;
};

// Reads one message of CRIU's lazy-pages protocol. Returns 0 or -errno (-ETIMEDOUT, -ECANCELED,
// -EPROTO for a malformed message).
int ReceiveMessage(int client_fd, int cancel_fd, int timeout_ms, LazyMessage* out);

// XXH64 (seed 0) of a whole file as 16 lowercase hex chars.
int HashFileXxh64(const std::string& path, int cancel_fd, std::string* hex, uint64_t* bytes, Failure* failure);

// Where a run of image pages lives in the target at dump time: image page index `first_page`
// (= offset in pages-*.img / 4096) … first_page + pages - 1 start at target address `addr`.
// Extents never cross a VMA boundary of the dump and are sorted by addr.
struct Extent {
  uint64_t addr;
  uint64_t first_page;
  uint64_t pages;
};

// A unit of eager work: image pages [first_page, first_page + pages), inside one extent.
struct Chunk {
  uint64_t first_page;
  uint64_t pages;
};

struct FillOptions {
  int uffd = -1;
  std::string pages_path;
  bool direct = false;                // O_DIRECT reads for the eager fill
  std::vector<Extent> extents;
  std::vector<Chunk> chunks;          // in fill order
  int threads = 2;                    // eager fill threads (faults have their own thread)
  uint64_t fault_ahead_pages = 16;    // pages copied with a faulting page (same extent, still missing)
  uint32_t follow_chunks = 8;         // after a fault, the chunks that follow it in memory jump the queue
  uint32_t prefetch_chunks = 2;       // buffered reads: readahead this many queued chunks ahead
  bool hash = false;                  // also XXH64 the pages file on a separate thread
  bool close_when_filled = true;      // close the uffd(s) once every page is in (never on failure)
  int cancel_fd = -1;
  // Eager copies wait until this fd is readable (CRIU's "restore finished": before it, lazy VMAs
  // may still be unregistered and the restore itself may fault); faults are answered from the
  // start. -1: start at once.
  int start_fd = -1;
};

struct TargetStats {
  int uffd = -1;                      // still open when closed_fd is false
  bool forked = false;                // a child created by UFFD_EVENT_FORK
  bool exited = false;                // the target's mm went away during the fill
  bool closed_fd = false;
  uint64_t total_pages = 0;
  uint64_t pages_copied = 0;          // installed by our UFFDIO_COPY
  uint64_t pages_existing = 0;        // UFFDIO_COPY met a page already there (EEXIST)
  uint64_t pages_dropped = 0;         // removed/unmapped by the app before we copied them
  uint64_t pages_vanished = 0;        // no registered VMA any more without an event (ENOENT)
  uint64_t pages_left = 0;            // still wanted at the end (must be 0 on success)
  uint64_t pages_raced = 0;           // a fault and a worker copied the same page: the second got EEXIST
  uint64_t faults = 0;
  uint64_t fault_pages_copied = 0;
  uint64_t zero_pages = 0;            // faults answered with UFFDIO_ZEROPAGE
  uint64_t events_fork = 0, events_remap = 0, events_remove = 0, events_unmap = 0;
};

struct FillResult {
  Failure failure;
  bool canceled = false;
  uint64_t bytes_read = 0;
  double start_ms = -1;               // when the eager fill could start (start_fd), -1 if never
  double fill_ms = 0;                 // until every page was in (uffds closed here when asked)
  double duration_ms = 0;             // including the hash
  double fault_wait_max_us = 0;       // longest time from reading a fault to answering it
  std::string hash_hex;               // when options.hash
  uint64_t hashed_bytes = 0;
  std::vector<TargetStats> targets;
};

// Runs a fill to the end (blocking): every chunk copied, or a failure, or cancel.
void RunFill(const FillOptions& options, FillResult* result);

}  // namespace thaw::uffd
