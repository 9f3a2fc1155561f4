// thaw_reaper: the two kernel calls a child subreaper needs and Node lacks, with no policy.
// - setChildSubreaper(on): prctl(PR_SET_CHILD_SUBREAPER), so processes orphaned below this one
//   (runsc's sandbox and gofer once `runsc create` exits, the waiter of `runsc exec`) become its
//   children and their exit statuses can be read here.
// - waitExit(pid): resolves once the child `pid` exited, and reaps it. It waits on a pidfd in
//   libuv's own poll loop, not in an AsyncWorker: a blocking waitpid would hold one of libuv's four
//   pool threads for a container's whole life and starve file I/O once four processes run. Only
//   the given pid is ever waited for (never -1), so libuv's reaping of its own children is untouched.
// src/runsc/reaper.ts decides what to adopt and how to read the result.
#include <napi.h>
#include <uv.h>

#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434  // the same number on every architecture
#endif

namespace {

int PidfdOpen(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

// {pid, errno, code, signal}: errno != 0 when the pid could not be waited for (ECHILD: not a
// child of this process); otherwise `code` for an exit, `signal` for a death by signal.
Napi::Object Result(Napi::Env env, pid_t pid, int err, const siginfo_t* si) {
  Napi::Object o = Napi::Object::New(env);
  int code = 0;
  int signal = 0;
  if (err == 0 && si != nullptr) {
    if (si->si_code == CLD_EXITED) code = si->si_status;
    else signal = si->si_status;  // CLD_KILLED, CLD_DUMPED
  }
  o.Set("pid", Napi::Number::New(env, pid));
  o.Set("errno", Napi::Number::New(env, err));
  o.Set("code", Napi::Number::New(env, code));
  o.Set("signal", Napi::Number::New(env, signal));
  return o;
}

// Reaps `pid` if it has exited. Returns 1 (reaped, `si` filled), 0 (still running) or -errno.
int TryReap(pid_t pid, siginfo_t* si) {
  for (;;) {
    *si = siginfo_t{};
    if (waitid(P_PID, static_cast<id_t>(pid), si, WEXITED | WNOHANG | __WALL) == 0) return si->si_pid == pid ? 1 : 0;
    if (errno != EINTR) return -errno;
  }
}

struct ExitWait {
  ExitWait(Napi::Env env, pid_t pid, int fd)
      : env(env), pid(pid), fd(fd), deferred(Napi::Promise::Deferred::New(env)), context(env, "thaw_reaper.waitExit") {}
  uv_poll_t poll{};
  Napi::Env env;
  pid_t pid;
  int fd;
  Napi::Promise::Deferred deferred;
  Napi::AsyncContext context;
};

void OnClosed(uv_handle_t* handle) {
  auto* w = static_cast<ExitWait*>(handle->data);
  close(w->fd);
  delete w;
}

void OnReadable(uv_poll_t* handle, int status, int /*events*/) {
  auto* w = static_cast<ExitWait*>(handle->data);
  siginfo_t si;
  int r = status < 0 ? -EIO : TryReap(w->pid, &si);
  if (r == 0) return;  // readable before the exit was reapable: keep polling
  uv_poll_stop(handle);
  {
    Napi::HandleScope scope(w->env);
    Napi::CallbackScope callback(w->env, w->context);  // runs the promise's reactions on close
    w->deferred.Resolve(Result(w->env, w->pid, r < 0 ? -r : 0, &si));
  }
  uv_close(reinterpret_cast<uv_handle_t*>(handle), OnClosed);
}

Napi::Value SetChildSubreaper(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throw Napi::TypeError::New(env, "setChildSubreaper(on: boolean)");
  int rc = prctl(PR_SET_CHILD_SUBREAPER, info[0].As<Napi::Boolean>().Value() ? 1 : 0, 0, 0, 0);
  return Napi::Number::New(env, rc == 0 ? 0 : errno);
}

// 0 when pidfds work here (Linux 5.3+), else the errno of pidfd_open.
Napi::Value PidfdSupport(const Napi::CallbackInfo& info) {
  int fd = PidfdOpen(getpid());
  if (fd < 0) return Napi::Number::New(info.Env(), errno);
  close(fd);
  return Napi::Number::New(info.Env(), 0);
}

Napi::Value WaitExit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "waitExit(pid: number)");
  int64_t raw = info[0].As<Napi::Number>().Int64Value();
  if (raw <= 0 || raw > 0x3fffffff) throw Napi::RangeError::New(env, "pid must be a positive process id");
  pid_t pid = static_cast<pid_t>(raw);

  // Not a child (ECHILD), or already exited: answer now. The pidfd is opened after this check, and
  // it stays valid for this pid until the pid is reaped, which only this wait does.
  siginfo_t si;
  int r = TryReap(pid, &si);
  auto settled = [&](int err, const siginfo_t* s) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Resolve(Result(env, pid, err, s));
    return d.Promise();
  };
  if (r < 0) return settled(-r, nullptr);
  if (r == 1) return settled(0, &si);
  int fd = PidfdOpen(pid);
  if (fd < 0) return settled(errno, nullptr);

  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    close(fd);
    throw Napi::Error::New(env, "no libuv loop");
  }
  auto* w = new ExitWait(env, pid, fd);
  w->poll.data = w;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc != 0) {  // nothing registered with libuv yet
    Napi::Promise promise = settled(-rc, nullptr);  // libuv errors are negative errnos
    close(fd);
    delete w;
    return promise;
  }
  rc = uv_poll_start(&w->poll, UV_READABLE, OnReadable);
  if (rc != 0) {
    Napi::Promise promise = w->deferred.Promise();
    w->deferred.Resolve(Result(env, pid, -rc, nullptr));
    uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnClosed);
    return promise;
  }
  return w->deferred.Promise();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("setChildSubreaper", Napi::Function::New(env, SetChildSubreaper, "setChildSubreaper"));
  exports.Set("pidfdSupport", Napi::Function::New(env, PidfdSupport, "pidfdSupport"));
  exports.Set("waitExit", Napi::Function::New(env, WaitExit, "waitExit"));
  return exports;
}

}  // namespace

NODE_API_MODULE(thaw_reaper, Init)
