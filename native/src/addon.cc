// thaw_io: file prefetch, copy and XXH64 hashing over io_uring, Linux AIO or a pread thread pool.
// This file only converts arguments; the TypeScript side (src/restore/native.ts) picks the backend,
// block size, queue depth and O_DIRECT, and validates before calling.
#include <napi.h>
#include <xxhash.h>

#include <cerrno>
#include <cmath>
#include <string>
#include <vector>

#include "io_queue.h"
#include "pipeline.h"
#include "workers.h"

namespace thaw {
namespace {

constexpr uint32_t kMaxBlockSize = 256u << 20;
constexpr uint32_t kMaxQueueDepth = 4096;

Backend ParseBackend(Napi::Env env, Napi::Value v) {
  std::string name = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (name == "uring") return Backend::kUring;
  if (name == "aio") return Backend::kAio;
  if (name == "pread") return Backend::kPread;
  throw Napi::TypeError::New(env, "backend must be 'uring', 'aio' or 'pread'");
}

double NumberField(Napi::Env env, Napi::Object o, const char* key, double fallback) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(key) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

uint64_t Unsigned(Napi::Env env, double d, const char* what) {
  if (!(d >= 0) || d > 9007199254740991.0 || std::floor(d) != d) {
    throw Napi::RangeError::New(env, std::string(what) + " must be a non-negative safe integer");
  }
  return static_cast<uint64_t>(d);
}

bool BoolField(Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  return v.IsBoolean() && v.As<Napi::Boolean>().Value();
}

std::string StringArg(Napi::Env env, Napi::Value v, const char* what) {
  if (!v.IsString()) throw Napi::TypeError::New(env, std::string(what) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

struct Parsed {
  PipelineOptions options;
  Napi::Value cancel_holder;
};

// options: {backend, blockSize, queueDepth, direct?, hash?, cancel?: Int32Array, faults?: {failAfterBytes, errno, shortRead}}
Parsed ParseOptions(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "options must be an object");
  Napi::Object o = v.As<Napi::Object>();
  Parsed p;
  p.options.backend = ParseBackend(env, o.Get("backend"));
  uint64_t bs = Unsigned(env, NumberField(env, o, "blockSize", 1 << 20), "blockSize");
  uint64_t qd = Unsigned(env, NumberField(env, o, "queueDepth", 16), "queueDepth");
  if (bs == 0 || bs > kMaxBlockSize) throw Napi::RangeError::New(env, "blockSize must be in 1..256 MiB");
  if (qd == 0 || qd > kMaxQueueDepth) throw Napi::RangeError::New(env, "queueDepth must be in 1..4096");
  p.options.block_size = static_cast<uint32_t>(bs);
  p.options.queue_depth = static_cast<uint32_t>(qd);
  p.options.direct = BoolField(o, "direct");
  p.options.hash = BoolField(o, "hash");
  Napi::Value cancel = o.Get("cancel");
  if (!cancel.IsUndefined()) {
    if (!cancel.IsTypedArray() || cancel.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
        cancel.As<Napi::Int32Array>().ElementLength() < 1) {
      throw Napi::TypeError::New(env, "cancel must be an Int32Array of length >= 1");
    }
    p.options.cancel = cancel.As<Napi::Int32Array>().Data();
    p.cancel_holder = cancel;
  }
  Napi::Value faults = o.Get("faults");
  if (faults.IsObject()) {
    Napi::Object f = faults.As<Napi::Object>();
    p.options.faults.enabled = true;
    p.options.faults.fail_after_bytes = Unsigned(env, NumberField(env, f, "failAfterBytes", 0), "failAfterBytes");
    p.options.faults.err = static_cast<int>(NumberField(env, f, "errno", 0));
    p.options.faults.short_read = BoolField(f, "shortRead");
  }
  return p;
}

StreamSpec RangeSpec(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "each range must be an object");
  Napi::Object r = v.As<Napi::Object>();
  StreamSpec s;
  s.src = StringArg(env, r.Get("path"), "range.path");
  s.offset = Unsigned(env, NumberField(env, r, "offset", 0), "range.offset");
  Napi::Value len = r.Get("length");
  s.length = len.IsUndefined() ? -1 : static_cast<int64_t>(Unsigned(env, NumberField(env, r, "length", 0), "range.length"));
  return s;
}

Napi::Array ArrayArg(Napi::Env env, Napi::Value v, const char* what) {
  if (!v.IsArray()) throw Napi::TypeError::New(env, std::string(what) + " must be an array");
  return v.As<Napi::Array>();
}

// prefetch(ranges: {path, offset?, length?}[], options)
Napi::Value Prefetch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array ranges = ArrayArg(env, info[0], "ranges");
  Parsed p = ParseOptions(env, info[1]);
  std::vector<StreamSpec> streams;
  for (uint32_t i = 0; i < ranges.Length(); ++i) streams.push_back(RangeSpec(env, ranges.Get(i)));
  return (new PrefetchWorker(env, p.options, p.cancel_holder, std::move(streams)))->Queue();
}

// copyFile(src, dst, options)
Napi::Value CopyFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  StreamSpec s;
  s.src = StringArg(env, info[0], "src");
  s.dst = StringArg(env, info[1], "dst");
  Parsed p = ParseOptions(env, info[2]);
  return (new CopyFileWorker(env, p.options, p.cancel_holder, std::move(s)))->Queue();
}

// hashFiles(paths, options)
Napi::Value HashFiles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array paths = ArrayArg(env, info[0], "paths");
  Parsed p = ParseOptions(env, info[1]);
  std::vector<StreamSpec> streams;
  for (uint32_t i = 0; i < paths.Length(); ++i) {
    StreamSpec s;
    s.src = StringArg(env, paths.Get(i), "path");
    streams.push_back(std::move(s));
  }
  return (new HashFilesWorker(env, p.options, p.cancel_holder, std::move(streams)))->Queue();
}

// readInto(path, target: TypedArray, fileOffset, length (-1: to end of file), options)
Napi::Value ReadInto(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  StreamSpec s;
  s.src = StringArg(env, info[0], "path");
  if (!info[1].IsTypedArray()) throw Napi::TypeError::New(env, "target must be a TypedArray");
  Napi::TypedArray target = info[1].As<Napi::TypedArray>();
  Napi::ArrayBuffer ab = target.ArrayBuffer();
  s.mem = static_cast<uint8_t*>(ab.Data()) + target.ByteOffset();
  s.mem_len = target.ByteLength();
  if (!info[2].IsNumber() || !info[3].IsNumber()) throw Napi::TypeError::New(env, "fileOffset and length must be numbers");
  s.offset = Unsigned(env, info[2].As<Napi::Number>().DoubleValue(), "fileOffset");
  double len = info[3].As<Napi::Number>().DoubleValue();
  s.length = len < 0 ? -1 : static_cast<int64_t>(Unsigned(env, len, "length"));
  Parsed p = ParseOptions(env, info[4]);
  return (new ReadIntoWorker(env, p.options, p.cancel_holder, std::move(s), target))->Queue();
}

// probe(backend) → 0 if a queue can be set up here, else -errno (io_uring refused: -EPERM or -ENOSYS).
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Backend backend = ParseBackend(env, info[0]);
  int err = 0;
  std::unique_ptr<IoQueue> q = MakeIoQueue(backend, 1, &err);
  return Napi::Number::New(env, q ? 0 : err);
}

// xxh64(data) → 16 hex chars: the library's one-shot hash, so tests can pin native == wasm.
Napi::Value Xxh64(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "data must be a TypedArray");
  Napi::TypedArray t = info[0].As<Napi::TypedArray>();
  const uint8_t* data = static_cast<const uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  return Napi::String::New(env, FormatXxh64(XXH64(data, t.ByteLength(), 0)));
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("version", Napi::String::New(env, "1"));
  exports.Set("xxhashVersion", Napi::Number::New(env, XXH_versionNumber()));
  exports.Set("prefetch", Napi::Function::New(env, Prefetch, "prefetch"));
  exports.Set("copyFile", Napi::Function::New(env, CopyFile, "copyFile"));
  exports.Set("hashFiles", Napi::Function::New(env, HashFiles, "hashFiles"));
  exports.Set("readInto", Napi::Function::New(env, ReadInto, "readInto"));
  exports.Set("probe", Napi::Function::New(env, Probe, "probe"));
  exports.Set("xxh64", Napi::Function::New(env, Xxh64, "xxh64"));
  return exports;
}

}  // namespace
}  // namespace thaw

static Napi::Object InitThawIo(Napi::Env env, Napi::Object exports) { return thaw::Init(env, exports); }

NODE_API_MODULE(thaw_io, InitThawIo)
