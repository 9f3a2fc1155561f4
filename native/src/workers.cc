#include "workers.h"

#include <cerrno>
#include <cstring>

namespace thaw {

PipelineWorker::PipelineWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder)
    : Napi::AsyncWorker(env, "thaw_io"), options_(std::move(options)), deferred_(Napi::Promise::Deferred::New(env)) {
  if (cancel_holder.IsObject()) cancel_ref_ = Napi::Persistent(cancel_holder.As<Napi::Object>());
}

Napi::Promise PipelineWorker::Queue() {
  Napi::Promise promise = deferred_.Promise();
  Napi::AsyncWorker::Queue();  // the worker deletes itself after OnOK/OnError
  return promise;
}

void PipelineWorker::Execute() { status_ = RunPipeline(options_, streams_, &results_); }

void PipelineWorker::OnOK() {
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  if (!status_.ok()) {
    deferred_.Reject(MakeIoError(env, status_, options_.backend).Value());
    return;
  }
  deferred_.Resolve(Result(env));
}

void PipelineWorker::OnError(const Napi::Error& e) { deferred_.Reject(e.Value()); }

namespace {

Napi::Object HashedResult(Napi::Env env, const StreamResult& r, bool with_hash) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("bytes", Napi::Number::New(env, static_cast<double>(r.bytes)));
  if (with_hash && r.hashed) o.Set("hash", Napi::String::New(env, FormatXxh64(r.hash)));
  return o;
}

}  // namespace

PrefetchWorker::PrefetchWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder,
                               std::vector<StreamSpec> streams)
    : PipelineWorker(env, std::move(options), cancel_holder) {
  streams_ = std::move(streams);
}

Napi::Value PrefetchWorker::Result(Napi::Env env) {
  Napi::Object out = Napi::Object::New(env);
  Napi::Array files = Napi::Array::New(env, results_.size());
  uint64_t total = 0;
  for (size_t i = 0; i < results_.size(); ++i) {
    Napi::Object f = HashedResult(env, results_[i], options_.hash);
    f.Set("path", Napi::String::New(env, streams_[i].src));
    f.Set("offset", Napi::Number::New(env, static_cast<double>(results_[i].offset)));
    files.Set(static_cast<uint32_t>(i), f);
    total += results_[i].bytes;
  }
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(total)));
  out.Set("files", files);
  return out;
}

CopyFileWorker::CopyFileWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder, StreamSpec stream)
    : PipelineWorker(env, std::move(options), cancel_holder) {
  streams_.push_back(std::move(stream));
}

Napi::Value CopyFileWorker::Result(Napi::Env env) { return HashedResult(env, results_.at(0), options_.hash); }

HashFilesWorker::HashFilesWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder,
                                 std::vector<StreamSpec> streams)
    : PipelineWorker(env, std::move(options), cancel_holder) {
  options_.hash = true;
  streams_ = std::move(streams);
}

Napi::Value HashFilesWorker::Result(Napi::Env env) {
  Napi::Array out = Napi::Array::New(env, results_.size());
  for (size_t i = 0; i < results_.size(); ++i) {
    Napi::Object f = HashedResult(env, results_[i], true);
    f.Set("path", Napi::String::New(env, streams_[i].src));
    out.Set(static_cast<uint32_t>(i), f);
  }
  return out;
}

ReadIntoWorker::ReadIntoWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder, StreamSpec stream,
                               Napi::Object target)
    : PipelineWorker(env, std::move(options), cancel_holder), target_ref_(Napi::Persistent(target)) {
  streams_.push_back(std::move(stream));
}

Napi::Value ReadIntoWorker::Result(Napi::Env env) { return HashedResult(env, results_.at(0), options_.hash); }

Napi::Error MakeIoError(Napi::Env env, const IoStatus& status, Backend backend) {
  std::string message = status.op + " failed";
  if (!status.path.empty()) message += " for " + status.path;
  message += ": ";
  message += status.detail.empty() ? std::strerror(status.err) : status.detail;
  if (!status.detail.empty()) message += std::string(" (") + std::strerror(status.err) + ")";
  Napi::Error e = Napi::Error::New(env, message);
  Napi::Object o = e.Value();
  o.Set("op", Napi::String::New(env, status.op));
  o.Set("errno", Napi::Number::New(env, status.err));
  o.Set("path", Napi::String::New(env, status.path));
  o.Set("backend", Napi::String::New(env, BackendName(backend)));
  // The kernel refuses io_uring here: TS falls back to another backend.
  bool refused = backend == Backend::kUring && status.op == BackendSetupOp(backend) &&
                 (status.err == EPERM || status.err == ENOSYS);
  o.Set("refused", Napi::Boolean::New(env, refused));
  return e;
}

}  // namespace thaw
