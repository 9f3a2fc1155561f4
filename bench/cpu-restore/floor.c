/*
 * floor: the physical floor of a memory restore on this machine, for bench/cpu-restore.
 *
 *   floor read-into FILE THREADS   read FILE into freshly mapped anonymous memory (what a restore
 *                                  must do at least: move the bytes and populate that much memory)
 *   floor read FILE THREADS        read FILE into a small per-thread buffer (storage / page cache only)
 *   floor touch BYTES THREADS      write one byte per 4 KiB page of fresh anonymous memory
 *
 * THREADS split the work into contiguous slices (one per core is the fair floor). Prints one JSON
 * line: {"mode":..., "bytes":..., "ms":...}; the time runs from before the mapping to the last byte.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (8u << 20)
#define PAGE 4096u

struct slice {
  int fd;
  char *dst; /* NULL: read into a private buffer */
  uint64_t off, len;
  int touch_only;
  int err;
};

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void *work(void *arg) {
  struct slice *s = arg;
  if (s->touch_only) {
    for (uint64_t i = 0; i < s->len; i += PAGE) s->dst[s->off + i] = 1;
    return NULL;
  }
  char *buf = s->dst ? NULL : malloc(CHUNK);
  for (uint64_t done = 0; done < s->len;) {
    uint64_t want = s->len - done < CHUNK ? s->len - done : CHUNK;
    char *to = s->dst ? s->dst + s->off + done : buf;
    ssize_t n = pread(s->fd, to, want, (off_t)(s->off + done));
    if (n <= 0) { s->err = 1; break; }
    done += (uint64_t)n;
  }
  free(buf);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: floor read-into|read FILE THREADS | floor touch BYTES THREADS\n");
    return 2;
  }
  const char *mode = argv[1];
  int threads = atoi(argv[3]);
  if (threads < 1) threads = 1;
  int touch = strcmp(mode, "touch") == 0;
  int into = strcmp(mode, "read-into") == 0;
  if (!touch && !into && strcmp(mode, "read") != 0) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }

  int fd = -1;
  uint64_t bytes;
  if (touch) {
    bytes = strtoull(argv[2], NULL, 10);
  } else {
    fd = open(argv[2], O_RDONLY);
    if (fd < 0) { perror(argv[2]); return 1; }
    struct stat st;
    fstat(fd, &st);
    bytes = (uint64_t)st.st_size;
  }

  double t0 = now_ms();
  char *mem = NULL;
  if (touch || into) {
    mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
  }
  pthread_t tid[64];
  struct slice sl[64];
  if (threads > 64) threads = 64;
  uint64_t per = (bytes / threads + PAGE - 1) / PAGE * PAGE;
  for (int i = 0; i < threads; i++) {
    uint64_t off = per * (uint64_t)i;
    uint64_t len = off >= bytes ? 0 : (bytes - off < per ? bytes - off : per);
    sl[i] = (struct slice){fd, mem, off, len, touch, 0};
    pthread_create(&tid[i], NULL, work, &sl[i]);
  }
  int err = 0;
  for (int i = 0; i < threads; i++) {
    pthread_join(tid[i], NULL);
    err |= sl[i].err;
  }
  double ms = now_ms() - t0;
  if (err) { fprintf(stderr, "short read\n"); return 1; }
  printf("{\"mode\":\"%s\",\"bytes\":%llu,\"threads\":%d,\"ms\":%.1f}\n", mode, (unsigned long long)bytes, threads, ms);
  return 0;
}
