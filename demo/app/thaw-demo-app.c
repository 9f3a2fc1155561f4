/*
 * thaw-demo-app: a stand-in for a slow-starting service, used by the demo, the tests and the
 * benchmarks. It "initialises" (sleeps --init-ms, like importing torch and compiling kernels),
 * fills --mib MiB with a deterministic pattern, prints READY, then ticks. SIGUSR1 verifies every
 * byte and prints VERIFY OK|FAIL, so a restored copy can prove its memory came back intact.
 * --listen-port N also holds a TCP socket listening on 127.0.0.1:N, as a server would.
 * Output lines: "<event> <key=value>..." with wall-clock ms, one per line, unbuffered.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t verify_requested;
static void on_usr1(int sig) { (void)sig; verify_requested = 1; }

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t pattern(uint64_t i, uint64_t seed) {
  uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  x ^= x >> 31;
  return x * 0xBF58476D1CE4E5B9ull;
}

static long arg_long(int argc, char **argv, const char *name, long def) {
  for (int i = 1; i + 1 < argc; i++)
    if (strcmp(argv[i], name) == 0) return strtol(argv[i + 1], NULL, 10);
  return def;
}

int main(int argc, char **argv) {
  long init_ms = arg_long(argc, argv, "--init-ms", 2000);
  long mib = arg_long(argc, argv, "--mib", 64);
  long tick_ms = arg_long(argc, argv, "--tick-ms", 200);
  long exit_after = arg_long(argc, argv, "--exit-after-ticks", -1);
  long exit_code = arg_long(argc, argv, "--exit-code", 0);
  uint64_t seed = (uint64_t)arg_long(argc, argv, "--seed", 42);
  long listen_port = arg_long(argc, argv, "--listen-port", 0);
  setvbuf(stdout, NULL, _IONBF, 0);
  signal(SIGUSR1, on_usr1);

  printf("START t=%llu pid=%d\n", (unsigned long long)now_ms(), getpid());
  struct timespec init = {init_ms / 1000, (init_ms % 1000) * 1000000L};
  nanosleep(&init, NULL);

  size_t words = (size_t)mib * (1u << 20) / sizeof(uint64_t);
  uint64_t *mem = NULL;
  if (words > 0) {
    mem = mmap(NULL, words * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { printf("ERROR mmap\n"); return 2; }
    for (size_t i = 0; i < words; i++) mem[i] = pattern(i, seed);
  }
  if (listen_port > 0) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)listen_port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) { printf("ERROR listen\n"); return 2; }
    printf("LISTEN port=%ld\n", listen_port);
  }
  printf("READY t=%llu mib=%ld\n", (unsigned long long)now_ms(), mib);

  for (long n = 1;; n++) {
    struct timespec tick = {tick_ms / 1000, (tick_ms % 1000) * 1000000L};
    nanosleep(&tick, NULL);
    if (verify_requested) {
      verify_requested = 0;
      size_t bad = 0;
      for (size_t i = 0; i < words; i++) bad += mem[i] != pattern(i, seed);
      printf("VERIFY %s t=%llu words=%zu bad=%zu\n", bad ? "FAIL" : "OK", (unsigned long long)now_ms(), words, bad);
    }
    printf("TICK n=%ld t=%llu\n", n, (unsigned long long)now_ms());
    if (exit_after >= 0 && n >= exit_after) return (int)exit_code;
  }
}
