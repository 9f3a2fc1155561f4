// N-API surface of the userfaultfd page server (see uffd.h). Arguments are copied into plain C++
// values on the main thread; Execute() runs without touching N-API; results become plain objects.
#include "uffd_worker.h"

#include <string.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "napi_errors.h"
#include "uffd.h"

namespace thaw::uffd {
namespace {

// A promise-returning worker: Work() returns 0 or -errno.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, const char* op) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), op_(op) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  virtual int Work() = 0;
  virtual Napi::Value Result(Napi::Env env) = 0;
  void Execute() override { rc_ = Work(); }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (rc_ < 0) {
      deferred_.Reject(ErrnoError(env, op_, -rc_).Value());
    } else {
      deferred_.Resolve(Result(env));
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::string op_;
  int rc_ = 0;
};

class AcceptWorker : public PromiseWorker {
 public:
  AcceptWorker(Napi::Env env, int listen_fd, int cancel_fd, int timeout_ms)
      : PromiseWorker(env, "accept"), listen_fd_(listen_fd), cancel_fd_(cancel_fd), timeout_ms_(timeout_ms) {}

 protected:
  int Work() override {
    fd_ = AcceptClient(listen_fd_, cancel_fd_, timeout_ms_);
    return fd_ < 0 ? fd_ : 0;
  }
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, fd_); }

 private:
  int listen_fd_, cancel_fd_, timeout_ms_;
  int fd_ = -1;
};

class ReceiveWorker : public PromiseWorker {
 public:
  ReceiveWorker(Napi::Env env, int client_fd, int cancel_fd, int timeout_ms)
      : PromiseWorker(env, "receive"), client_fd_(client_fd), cancel_fd_(cancel_fd), timeout_ms_(timeout_ms) {}

 protected:
  int Work() override { return ReceiveMessage(client_fd_, cancel_fd_, timeout_ms_, &msg_); }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    const char* kind = "closed";
    switch (msg_.kind) {
      case LazyMessage::kTask: kind = "task"; break;
      case LazyMessage::kZombie: kind = "zombie"; break;
      case LazyMessage::kFinished: kind = "finished"; break;
      case LazyMessage::kClosed: kind = "closed"; break;
    }
    o.Set("kind", kind);
    o.Set("pid", msg_.pid);
    o.Set("uffd", msg_.uffd);
    return o;
  }

 private:
  int client_fd_, cancel_fd_, timeout_ms_;
  LazyMessage msg_;
};

class HashWorker : public PromiseWorker {
 public:
  HashWorker(Napi::Env env, std::string path, int cancel_fd) : PromiseWorker(env, "hash"), path_(std::move(path)), cancel_fd_(cancel_fd) {}

 protected:
  int Work() override {
    if (HashFileXxh64(path_, cancel_fd_, &hex_, &bytes_, &failure_) == 0) return 0;
    SetError(failure_.message);
    return 0;
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = Napi::Object::New(env);
    o.Set("hash", hex_);
    o.Set("bytes", static_cast<double>(bytes_));
    return o;
  }
  void OnError(const Napi::Error& e) override {
    PromiseWorker::OnError(OpError(Env(), failure_.op, failure_.err, e.Message()));
  }

 private:
  std::string path_;
  int cancel_fd_;
  std::string hex_;
  uint64_t bytes_ = 0;
  Failure failure_;
};

// fill()'s answer: the outcome in every case (ok or not), so the caller always learns which
// userfaultfds are still open — it must kill the target before closing them.
Napi::Object FillResultObject(Napi::Env env, const FillOptions& options, const FillResult& result) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ok", !result.failure.failed() && !result.canceled);
  o.Set("canceled", result.canceled);
  if (result.failure.failed()) {
    Napi::Object f = Napi::Object::New(env);
    f.Set("op", result.failure.op);
    f.Set("errno", result.failure.err);
    f.Set("message", result.failure.message);
    o.Set("error", f);
  }
  o.Set("bytesRead", static_cast<double>(result.bytes_read));
  o.Set("startMs", result.start_ms);
  o.Set("fillMs", result.fill_ms);
  o.Set("durationMs", result.duration_ms);
  o.Set("faultWaitMaxUs", result.fault_wait_max_us);
  if (options.hash) {
    o.Set("hash", result.hash_hex);
    o.Set("hashedBytes", static_cast<double>(result.hashed_bytes));
  }
  Napi::Array targets = Napi::Array::New(env, result.targets.size());
  for (size_t i = 0; i < result.targets.size(); i++) {
    const TargetStats& s = result.targets[i];
    Napi::Object t = Napi::Object::New(env);
    t.Set("uffd", s.uffd);
    t.Set("forked", s.forked);
    t.Set("exited", s.exited);
    t.Set("closed", s.closed_fd);
    t.Set("totalPages", static_cast<double>(s.total_pages));
    t.Set("pagesCopied", static_cast<double>(s.pages_copied));
    t.Set("pagesExisting", static_cast<double>(s.pages_existing));
    t.Set("pagesDropped", static_cast<double>(s.pages_dropped));
    t.Set("pagesVanished", static_cast<double>(s.pages_vanished));
    t.Set("pagesLeft", static_cast<double>(s.pages_left));
    t.Set("pagesRaced", static_cast<double>(s.pages_raced));
    t.Set("faults", static_cast<double>(s.faults));
    t.Set("faultPagesCopied", static_cast<double>(s.fault_pages_copied));
    t.Set("zeroPages", static_cast<double>(s.zero_pages));
    Napi::Object ev = Napi::Object::New(env);
    ev.Set("fork", static_cast<double>(s.events_fork));
    ev.Set("remap", static_cast<double>(s.events_remap));
    ev.Set("remove", static_cast<double>(s.events_remove));
    ev.Set("unmap", static_cast<double>(s.events_unmap));
    t.Set("events", ev);
    targets.Set(i, t);
  }
  o.Set("targets", targets);
  return o;
}

// A fill runs for the whole restore, one per restored task, so it gets a thread of its own instead
// of one of libuv's pool threads (four unless UV_THREADPOOL_SIZE says otherwise): four tasks' fills
// held every pool thread, and the next receive() — and the fifth task's fill — never ran; a restore
// of four processes with lazy pages hung (4 H100s, NCCL ranks). The promise is settled on the main
// thread through a thread-safe function, which also keeps the event loop alive meanwhile.
struct FillJob {
  FillJob(Napi::Env env, FillOptions o) : options(std::move(o)), deferred(Napi::Promise::Deferred::New(env)) {}
  FillOptions options;
  FillResult result;
  Napi::Promise::Deferred deferred;
};

Napi::Promise StartFill(Napi::Env env, FillOptions options) {
  auto* job = new FillJob(env, std::move(options));
  Napi::Promise promise = job->deferred.Promise();
  auto done = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "thaw-uffd-fill", 0, 1);
  try {
    std::thread([job, done]() mutable {
      RunFill(job->options, &job->result);
      napi_status st = done.BlockingCall(job, [](Napi::Env env, Napi::Function, FillJob* j) {
        Napi::HandleScope scope(env);
        j->deferred.Resolve(FillResultObject(env, j->options, j->result));
        delete j;
      });
      if (st != napi_ok) delete job;  // the environment is going away: nobody waits for the answer
      done.Release();
    }).detach();
  } catch (const std::system_error& e) {
    done.Release();
    job->deferred.Reject(ErrnoError(env, "fill thread", e.code().value()).Value());
    delete job;
  }
  return promise;
}

// Copies a BigUint64Array of `width`-tuples.
std::vector<uint64_t> U64Tuples(Napi::Env env, Napi::Value v, const char* name, size_t width) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array) {
    throw Napi::TypeError::New(env, std::string(name) + " must be a BigUint64Array");
  }
  auto a = v.As<Napi::TypedArrayOf<uint64_t>>();
  if (a.ElementLength() % width != 0) throw Napi::TypeError::New(env, std::string(name) + " has a partial tuple");
  return std::vector<uint64_t>(a.Data(), a.Data() + a.ElementLength());
}

Napi::Value Listen(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "path must be a string");
  int fd = ListenUnix(info[0].As<Napi::String>().Utf8Value(), 16);
  if (fd < 0) throw ErrnoError(info.Env(), "listen", -fd);
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value Accept(const Napi::CallbackInfo& info) {
  auto* w = new AcceptWorker(info.Env(), IntArg(info, 0, "listenFd"), IntArg(info, 1, "cancelFd"), IntArg(info, 2, "timeoutMs"));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value Receive(const Napi::CallbackInfo& info) {
  auto* w = new ReceiveWorker(info.Env(), IntArg(info, 0, "clientFd"), IntArg(info, 1, "cancelFd"), IntArg(info, 2, "timeoutMs"));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value HashFile(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "path must be a string");
  auto* w = new HashWorker(info.Env(), info[0].As<Napi::String>().Utf8Value(), IntArg(info, 1, "cancelFd"));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value Fill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
  Napi::Object o = info[0].As<Napi::Object>();
  auto num = [&](const char* k) -> double {
    Napi::Value v = o.Get(k);
    if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(k) + " must be a number");
    return v.As<Napi::Number>().DoubleValue();
  };
  auto flag = [&](const char* k) -> bool {
    Napi::Value v = o.Get(k);
    if (!v.IsBoolean()) throw Napi::TypeError::New(env, std::string(k) + " must be a boolean");
    return v.As<Napi::Boolean>().Value();
  };
  FillOptions f;
  f.uffd = static_cast<int>(num("uffd"));
  Napi::Value path = o.Get("pagesPath");
  if (!path.IsString()) throw Napi::TypeError::New(env, "pagesPath must be a string");
  f.pages_path = path.As<Napi::String>().Utf8Value();
  f.direct = flag("direct");
  f.threads = static_cast<int>(num("threads"));
  f.fault_ahead_pages = static_cast<uint64_t>(num("faultAheadPages"));
  f.follow_chunks = static_cast<uint32_t>(num("followChunks"));
  f.prefetch_chunks = static_cast<uint32_t>(num("prefetchChunks"));
  f.hash = flag("hash");
  f.close_when_filled = flag("closeWhenFilled");
  f.cancel_fd = static_cast<int>(num("cancelFd"));
  f.start_fd = static_cast<int>(num("startFd"));
  std::vector<uint64_t> ext = U64Tuples(env, o.Get("extents"), "extents", 3);
  for (size_t i = 0; i < ext.size(); i += 3) f.extents.push_back({ext[i], ext[i + 1], ext[i + 2]});
  std::vector<uint64_t> ch = U64Tuples(env, o.Get("chunks"), "chunks", 2);
  for (size_t i = 0; i < ch.size(); i += 2) f.chunks.push_back({ch[i], ch[i + 1]});
  if (f.chunks.size() > UINT32_MAX) throw Napi::RangeError::New(env, "too many chunks");
  if (f.threads < 1 || f.threads > 256) throw Napi::RangeError::New(env, "threads must be 1..256");
  return StartFill(env, std::move(f));
}

Napi::Value CreateCancel(const Napi::CallbackInfo& info) {
  int fd = CreateCancelFd();
  if (fd < 0) throw ErrnoError(info.Env(), "eventfd", -fd);
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value Cancel(const Napi::CallbackInfo& info) {
  int rc = SignalCancel(IntArg(info, 0, "fd"));
  if (rc < 0) throw ErrnoError(info.Env(), "cancel", -rc);
  return info.Env().Undefined();
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  if (::close(IntArg(info, 0, "fd")) < 0 && errno != EINTR) throw ErrnoError(info.Env(), "close", errno);
  return info.Env().Undefined();
}

}  // namespace

void RegisterUffdExports(Napi::Env env, Napi::Object exports) {
  exports.Set("listen", Napi::Function::New(env, Listen, "listen"));
  exports.Set("accept", Napi::Function::New(env, Accept, "accept"));
  exports.Set("receive", Napi::Function::New(env, Receive, "receive"));
  exports.Set("fill", Napi::Function::New(env, Fill, "fill"));
  exports.Set("hashFile", Napi::Function::New(env, HashFile, "hashFile"));
  exports.Set("createCancel", Napi::Function::New(env, CreateCancel, "createCancel"));
  exports.Set("cancel", Napi::Function::New(env, Cancel, "cancel"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
}

}  // namespace thaw::uffd

#ifdef THAW_UFFD_STANDALONE
// The stand-alone addon (native/uffd/binding.gyp → thaw_uffd.node).
static Napi::Object InitThawUffd(Napi::Env env, Napi::Object exports) {
  thaw::uffd::RegisterUffdExports(env, exports);
  return exports;
}
NODE_API_MODULE(thaw_uffd, InitThawUffd)
#endif
