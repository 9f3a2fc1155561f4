// Streams file ranges through fixed-size blocks on an IoQueue, with up to queue_depth blocks in flight
// across files: each block is read, then (in file order) hashed with XXH64, then written to a
// destination file or left in caller memory — or just dropped (prefetch: the data now sits in the
// page cache). No N-API here: this runs on a worker thread. No policy either: sizes, depth, backend
// and O_DIRECT come from the caller.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io_queue.h"

namespace thaw {

// O_DIRECT alignment for offsets, lengths and memory (covers 512- and 4096-byte logical blocks).
constexpr uint64_t kDirectAlign = 4096;

// ENODATA marks a short read: the file ended (or a read returned less) before the expected byte.
constexpr int kShortReadErrno = 61;  // ENODATA

// Test-only faults applied to read completions, after the kernel returned.
struct FaultSpec {
  bool enabled = false;
  uint64_t fail_after_bytes = 0;  // reads succeed until this many bytes have been read in total
  int err = 0;                    // then fail with this errno (EIO when 0) ...
  bool short_read = false;        // ... or return 0 bytes (end of file) instead
};

struct StreamSpec {
  std::string src;
  uint64_t offset = 0;
  int64_t length = -1;     // -1: up to the end of the file
  std::string dst;         // copy into this file (created/truncated); empty: no destination
  uint8_t* mem = nullptr;  // read into this memory instead; nullptr: none
  uint64_t mem_len = 0;
};

struct StreamResult {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  bool hashed = false;
  uint64_t hash = 0;
};

struct PipelineOptions {
  Backend backend = Backend::kPread;
  uint32_t block_size = 1 << 20;
  uint32_t queue_depth = 16;
  bool direct = false;  // O_DIRECT on the sources (destinations are always buffered)
  bool hash = false;
  FaultSpec faults;
  const int32_t* cancel = nullptr;  // non-zero (written by another thread) cancels
};

struct IoStatus {
  int err = 0;  // errno (positive); 0 = success
  std::string op;
  std::string path;
  std::string detail;
  bool ok() const { return err == 0; }
};

// Runs all streams; fills results (one per stream) on success. The first error stops new I/O, waits
// for what is in flight, and is returned.
IoStatus RunPipeline(const PipelineOptions& options, const std::vector<StreamSpec>& streams,
                     std::vector<StreamResult>* results);

// Formats an XXH64 value the way thaw's manifests do: 16 lowercase hex digits.
std::string FormatXxh64(uint64_t value);

}  // namespace thaw
