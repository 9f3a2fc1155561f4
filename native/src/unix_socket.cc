#include "unix_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>

#include "unique_fd.h"

namespace thaw {

double NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int WaitReadable(int fd, int cancel_fd, int timeout_ms) {
  pollfd fds[2] = {{fd, POLLIN, 0}, {cancel_fd, POLLIN, 0}};
  nfds_t n = cancel_fd >= 0 ? 2 : 1;
  double deadline = NowMs() + timeout_ms;
  for (;;) {
    int left = timeout_ms < 0 ? -1 : std::max(0, static_cast<int>(deadline - NowMs()));
    int rc = poll(fds, n, left);
    if (rc < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 2 && (fds[1].revents & POLLIN)) return -ECANCELED;
    if (fds[0].revents) return 1;
    if (rc == 0) return -ETIMEDOUT;
  }
}

int ListenUnix(const std::string& path, int backlog) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string bind_path = path;
  UniqueFd dir;
  if (path.size() >= sizeof(addr.sun_path)) {
    // sun_path holds 107 bytes; CRIU connects relative to its work dir, which may be deeper. Bind
    // through the directory's /proc/self/fd link instead (the socket still lands at `path`).
    size_t slash = path.rfind('/');
    if (slash == std::string::npos || slash + 1 == path.size()) return -ENAMETOOLONG;
    dir.Reset(open(slash == 0 ? "/" : path.substr(0, slash).c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (dir.get() < 0) return -errno;
    bind_path = "/proc/self/fd/" + std::to_string(dir.get()) + "/" + path.substr(slash + 1);
  }
  if (bind_path.empty() || bind_path.size() >= sizeof(addr.sun_path)) return -ENAMETOOLONG;
  memcpy(addr.sun_path, bind_path.c_str(), bind_path.size() + 1);
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return -errno;
  struct stat st;
  if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path.c_str());
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) return -errno;
  if (listen(fd.get(), backlog) < 0) {
    int err = errno;
    unlink(path.c_str());
    return -err;
  }
  return fd.Release();
}

int AcceptClient(int listen_fd, int cancel_fd, int timeout_ms) {
  int rc = WaitReadable(listen_fd, cancel_fd, timeout_ms);
  if (rc < 0) return rc;
  for (;;) {
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno != EINTR) return -errno;
  }
}

int CreateCancelFd() {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  return fd < 0 ? -errno : fd;
}

int SignalCancel(int fd) {
  uint64_t one = 1;
  return write(fd, &one, sizeof one) == sizeof one ? 0 : -errno;
}

}  // namespace thaw
