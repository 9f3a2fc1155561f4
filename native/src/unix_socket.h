// Unix-socket and cancel-fd mechanics shared by the page-server addon (CRIU's lazy-pages socket) and
// the console addon (--console-socket): no N-API, no policy. Errors are returned as -errno.
#pragma once

#include <string>

namespace thaw {

// CLOCK_MONOTONIC in milliseconds.
double NowMs();

// Polls fd plus cancel_fd (-1: none) for up to timeout_ms (< 0: no limit). Returns 1 when fd is
// ready, or -ETIMEDOUT / -ECANCELED (cancel_fd readable) / -errno.
int WaitReadable(int fd, int cancel_fd, int timeout_ms);

// A bound, listening AF_UNIX stream socket at `path` (unlinks a stale socket file first; a path
// longer than sun_path is bound through its directory's /proc/self/fd link). Returns the fd or -errno.
int ListenUnix(const std::string& path, int backlog);

// Waits up to timeout_ms (or until cancel_fd is readable) for one connection; returns the client
// fd (close-on-exec) or -errno (-ETIMEDOUT, -ECANCELED).
int AcceptClient(int listen_fd, int cancel_fd, int timeout_ms);

// An eventfd used to cancel blocking calls; SignalCancel makes it readable for good.
int CreateCancelFd();
int SignalCancel(int fd);

}  // namespace thaw
