// Console-socket mechanics for terminal tasks, no policy: a listening AF_UNIX socket, one AsyncWorker
// that accepts one connection and receives one fd over SCM_RIGHTS (what runsc and runc send to
// --console-socket: the pty master), and ioctls on a pty. Timeouts, paths, retries, relaying and
// closing are the caller's (src/task/console.ts).
#include <napi.h>

#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include "../../src/napi_errors.h"
#include "../../src/unique_fd.h"
#include "../../src/unix_socket.h"

namespace {

using OwnedFd = thaw::UniqueFd;
using thaw::ErrnoError;
using thaw::IntArg;

// Accepts one connection and reads until one fd arrives (the payload bytes — runc sends the pty's
// name — are ignored). Returns the received fd (close-on-exec) or -errno; -EPROTO when the peer
// closes without sending one.
int ReceiveOneFd(int listen_fd, int cancel_fd, int timeout_ms) {
  const double deadline = thaw::NowMs() + timeout_ms;
  OwnedFd conn(thaw::AcceptClient(listen_fd, cancel_fd, timeout_ms));
  if (conn.get() < 0) return conn.Release();
  for (;;) {
    int left = timeout_ms < 0 ? -1 : std::max(0, static_cast<int>(deadline - thaw::NowMs()));
    int rc = thaw::WaitReadable(conn.get(), cancel_fd, left);
    if (rc < 0) return rc;
    char data[4096];
    iovec iov{data, sizeof data};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(conn.get(), &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    int received = -1;
    for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
      if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
        if (received < 0) received = fd;
        else ::close(fd);  // one pty per connection; extras would leak
      }
    }
    if (received >= 0) return received;
    if (msg.msg_flags & MSG_CTRUNC) return -EPROTO;
    if (n == 0) return -EPROTO;
  }
}

class ReceiveWorker : public Napi::AsyncWorker {
 public:
  ReceiveWorker(Napi::Env env, int listen_fd, int cancel_fd, int timeout_ms)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)),
        listen_fd_(listen_fd), cancel_fd_(cancel_fd), timeout_ms_(timeout_ms) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  void Execute() override { rc_ = ReceiveOneFd(listen_fd_, cancel_fd_, timeout_ms_); }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (rc_ < 0) deferred_.Reject(ErrnoError(env, "receive", -rc_).Value());
    else deferred_.Resolve(Napi::Number::New(env, rc_));
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  int listen_fd_, cancel_fd_, timeout_ms_;
  int rc_ = -1;
};

// listen(path) → fd
Napi::Value Listen(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "path must be a string");
  int fd = thaw::ListenUnix(info[0].As<Napi::String>().Utf8Value(), 1);
  if (fd < 0) throw ErrnoError(info.Env(), "listen", -fd);
  return Napi::Number::New(info.Env(), fd);
}

// receive(listenFd, cancelFd, timeoutMs) → Promise<fd>
Napi::Value Receive(const Napi::CallbackInfo& info) {
  auto* w = new ReceiveWorker(info.Env(), IntArg(info, 0, "listenFd"), IntArg(info, 1, "cancelFd"), IntArg(info, 2, "timeoutMs"));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// setWindowSize(fd, rows, cols)
Napi::Value SetWindowSize(const Napi::CallbackInfo& info) {
  winsize ws{};
  ws.ws_row = static_cast<unsigned short>(IntArg(info, 1, "rows"));
  ws.ws_col = static_cast<unsigned short>(IntArg(info, 2, "cols"));
  if (ioctl(IntArg(info, 0, "fd"), TIOCSWINSZ, &ws) < 0) throw ErrnoError(info.Env(), "TIOCSWINSZ", errno);
  return info.Env().Undefined();
}

// getWindowSize(fd) → {rows, cols}
Napi::Value GetWindowSize(const Napi::CallbackInfo& info) {
  winsize ws{};
  if (ioctl(IntArg(info, 0, "fd"), TIOCGWINSZ, &ws) < 0) throw ErrnoError(info.Env(), "TIOCGWINSZ", errno);
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("rows", ws.ws_row);
  o.Set("cols", ws.ws_col);
  return o;
}

// setNonBlocking(fd, on)
Napi::Value SetNonBlocking(const Napi::CallbackInfo& info) {
  int fd = IntArg(info, 0, "fd");
  if (info.Length() < 2 || !info[1].IsBoolean()) throw Napi::TypeError::New(info.Env(), "on must be a boolean");
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) throw ErrnoError(info.Env(), "fcntl", errno);
  flags = info[1].As<Napi::Boolean>().Value() ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (fcntl(fd, F_SETFL, flags) < 0) throw ErrnoError(info.Env(), "fcntl", errno);
  return info.Env().Undefined();
}

Napi::Value CreateCancel(const Napi::CallbackInfo& info) {
  int fd = thaw::CreateCancelFd();
  if (fd < 0) throw ErrnoError(info.Env(), "eventfd", -fd);
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value Cancel(const Napi::CallbackInfo& info) {
  int rc = thaw::SignalCancel(IntArg(info, 0, "fd"));
  if (rc < 0 && rc != -EAGAIN) throw ErrnoError(info.Env(), "cancel", -rc);
  return info.Env().Undefined();
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  if (::close(IntArg(info, 0, "fd")) < 0 && errno != EINTR) throw ErrnoError(info.Env(), "close", errno);
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("listen", Napi::Function::New(env, Listen, "listen"));
  exports.Set("receive", Napi::Function::New(env, Receive, "receive"));
  exports.Set("setWindowSize", Napi::Function::New(env, SetWindowSize, "setWindowSize"));
  exports.Set("getWindowSize", Napi::Function::New(env, GetWindowSize, "getWindowSize"));
  exports.Set("setNonBlocking", Napi::Function::New(env, SetNonBlocking, "setNonBlocking"));
  exports.Set("createCancel", Napi::Function::New(env, CreateCancel, "createCancel"));
  exports.Set("cancel", Napi::Function::New(env, Cancel, "cancel"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  return exports;
}

}  // namespace

NODE_API_MODULE(thaw_console, Init)
