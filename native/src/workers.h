// One Napi::AsyncWorker per operation, each settling a promise. Arguments are converted on the main
// thread in the constructor; Execute() runs the pipeline and touches no N-API; OnOK() builds the
// result or the error object.
#pragma once

#include <napi.h>

#include <string>
#include <vector>

#include "pipeline.h"

namespace thaw {

class PipelineWorker : public Napi::AsyncWorker {
 public:
  Napi::Promise Queue();

 protected:
  PipelineWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder);
  void Execute() override;
  void OnOK() override;
  void OnError(const Napi::Error& e) override;
  virtual Napi::Value Result(Napi::Env env) = 0;

  PipelineOptions options_;
  std::vector<StreamSpec> streams_;
  std::vector<StreamResult> results_;
  IoStatus status_;

 private:
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference cancel_ref_;  // keeps the cancel flag's memory alive while we read it
};

// prefetch(ranges, options) → {bytes, files: [{path, offset, bytes, hash?}]}
class PrefetchWorker final : public PipelineWorker {
 public:
  PrefetchWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder, std::vector<StreamSpec> streams);

 protected:
  Napi::Value Result(Napi::Env env) override;
};

// copyFile(src, dst, options) → {bytes, hash?}
class CopyFileWorker final : public PipelineWorker {
 public:
  CopyFileWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder, StreamSpec stream);

 protected:
  Napi::Value Result(Napi::Env env) override;
};

// hashFiles(paths, options) → [{path, bytes, hash}]
class HashFilesWorker final : public PipelineWorker {
 public:
  HashFilesWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder, std::vector<StreamSpec> streams);

 protected:
  Napi::Value Result(Napi::Env env) override;
};

// readInto(path, target, fileOffset, length, options) → {bytes, hash?}; target stays referenced until done.
class ReadIntoWorker final : public PipelineWorker {
 public:
  ReadIntoWorker(Napi::Env env, PipelineOptions options, Napi::Value cancel_holder, StreamSpec stream,
                 Napi::Object target);

 protected:
  Napi::Value Result(Napi::Env env) override;

 private:
  Napi::ObjectReference target_ref_;
};

// The error object a failed operation rejects with: Error{message, op, errno, path, refused}.
Napi::Error MakeIoError(Napi::Env env, const IoStatus& status, Backend backend);

}  // namespace thaw
