/*
 * A stand-in libcuda.so.1 for testing thaw-cuda on machines without a GPU (test/gpu/thaw-cuda.test.ts
 * builds it into a temp dir and points THAW_CUDA_LIBCUDA at it). It models the checkpoint state machine
 * per pid in files under $FAKE_CUDA_DIR and checks what the real driver insists on: reserved fields
 * zeroed, legal transitions only. Not part of any shipped build.
 *
 *   $FAKE_CUDA_DIR/<pid>.state   running|locked|checkpointed|failed (absent = not a CUDA process)
 *   $FAKE_CUDA_DIR/calls         one line per call: "<fn> <pid> [detail]"
 *   FAKE_CUDA_LOCK_BUSY=1        lock with a timeout returns CUDA_ERROR_NOT_READY (600)
 *   FAKE_CUDA_NO_INIT=1          cuInit fails with CUDA_ERROR_NO_DEVICE (100)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { unsigned int timeoutMs; unsigned int reserved0; uint64_t reserved1[7]; } LockArgs;
typedef struct { uint64_t reserved[8]; } PlainArgs;
typedef struct { CUuuid oldUuid, newUuid; } GpuPair;
typedef struct { GpuPair *gpuPairs; unsigned int gpuPairsCount; char reserved[44]; uint64_t reserved1; } RestoreArgs;

enum { OK = 0, INVALID_VALUE = 1, NOT_INITIALIZED = 3, NO_DEVICE = 100, NOT_READY = 600, ILLEGAL_STATE = 401 };
static const char *const states[] = {"running", "locked", "checkpointed", "failed"};
static int initialized;

static void path_of(char *out, size_t len, const char *name) {
    const char *dir = getenv("FAKE_CUDA_DIR");
    snprintf(out, len, "%s/%s", dir ? dir : "/tmp", name);
}

static void record(const char *fn, int pid, const char *detail) {
    char p[4096];
    path_of(p, sizeof p, "calls");
    FILE *f = fopen(p, "a");
    if (!f) return;
    fprintf(f, "%s %d%s%s\n", fn, pid, detail ? " " : "", detail ? detail : "");
    fclose(f);
}

static int read_state(int pid) {
    char name[32], p[4096], buf[32] = "";
    snprintf(name, sizeof name, "%d.state", pid);
    path_of(p, sizeof p, name);
    FILE *f = fopen(p, "r");
    if (!f) return -1;
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    buf[strcspn(buf, "\n")] = 0;
    for (int i = 0; i < 4; i++)
        if (!strcmp(buf, states[i])) return i;
    return -1;
}

static void write_state(int pid, int s) {
    char name[32], p[4096];
    snprintf(name, sizeof name, "%d.state", pid);
    path_of(p, sizeof p, name);
    FILE *f = fopen(p, "w");
    if (!f) return;
    fprintf(f, "%s\n", states[s]);
    fclose(f);
}

static int all_zero(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

static CUresult transition(const char *fn, int pid, int from, int to, const char *detail) {
    record(fn, pid, detail);
    int s = read_state(pid);
    if (s < 0) return INVALID_VALUE;
    if (s != from) return ILLEGAL_STATE;
    write_state(pid, to);
    return OK;
}

CUresult cuInit(unsigned int flags) {
    if (flags) return INVALID_VALUE;
    if (getenv("FAKE_CUDA_NO_INIT")) return NO_DEVICE;
    initialized = 1;
    return OK;
}
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuGetErrorName(CUresult r, const char **s) {
    switch (r) {
    case OK: *s = "CUDA_SUCCESS"; return OK;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; return OK;
    case NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; return OK;
    case NOT_READY: *s = "CUDA_ERROR_NOT_READY"; return OK;
    case ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; return OK;
    }
    return INVALID_VALUE;
}
CUresult cuGetErrorString(CUresult r, const char **s) { (void)r; *s = "fake error"; return OK; }
CUresult cuDeviceGetCount(int *n) { if (!initialized) return NOT_INITIALIZED; *n = 2; return OK; }
CUresult cuDeviceGet(int *d, int i) { *d = i; return OK; }
CUresult cuDeviceGetName(char *name, int len, int d) { snprintf(name, (size_t)len, "Fake GPU %d", d); return OK; }
CUresult cuDeviceTotalMem_v2(size_t *b, int d) { (void)d; *b = (size_t)80 << 30; return OK; }
CUresult cuDeviceGetUuid_v2(CUuuid *u, int d) {
    for (int i = 0; i < 16; i++) u->bytes[i] = (char)(0x10 * d + i);
    return OK;
}
CUresult cuDeviceGetPCIBusId(char *s, int len, int d) { snprintf(s, (size_t)len, "0000:%02x:00.0", d + 1); return OK; }
CUresult cuDeviceGetAttribute(int *v, int attr, int d) { (void)d; *v = attr == 75 ? 9 : 0; return OK; }

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    record("getState", pid, NULL);
    int s = read_state(pid);
    if (s < 0) return INVALID_VALUE;
    *state = s;
    return OK;
}
CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
    record("getRestoreThreadId", pid, NULL);
    if (read_state(pid) < 0) return INVALID_VALUE;
    *tid = pid + 1;
    return OK;
}
CUresult cuCheckpointProcessLock(int pid, LockArgs *a) {
    if (!a || a->reserved0 || !all_zero(a->reserved1, sizeof a->reserved1)) return INVALID_VALUE;
    char d[32];
    snprintf(d, sizeof d, "timeout=%u", a->timeoutMs);
    if (getenv("FAKE_CUDA_LOCK_BUSY") && a->timeoutMs > 0) {
        record("lock", pid, d);
        return NOT_READY;
    }
    return transition("lock", pid, 0, 1, d);
}
CUresult cuCheckpointProcessCheckpoint(int pid, PlainArgs *a) {
    if (a && !all_zero(a, sizeof *a)) return INVALID_VALUE;
    return transition("checkpoint", pid, 1, 2, NULL);
}
CUresult cuCheckpointProcessRestore(int pid, RestoreArgs *a) {
    if (a && (!all_zero(a->reserved, sizeof a->reserved) || a->reserved1)) return INVALID_VALUE;
    char d[256] = "";
    if (a && a->gpuPairsCount) {
        size_t n = 0;
        n += (size_t)snprintf(d + n, sizeof d - n, "pairs=%u", a->gpuPairsCount);
        for (unsigned i = 0; i < a->gpuPairsCount && n < sizeof d - 8; i++)
            n += (size_t)snprintf(d + n, sizeof d - n, " %02x..%02x>%02x..%02x", (unsigned char)a->gpuPairs[i].oldUuid.bytes[0],
                                  (unsigned char)a->gpuPairs[i].oldUuid.bytes[15], (unsigned char)a->gpuPairs[i].newUuid.bytes[0],
                                  (unsigned char)a->gpuPairs[i].newUuid.bytes[15]);
    }
    snprintf(d + strlen(d), sizeof d - strlen(d), "%sinit=%d", d[0] ? " " : "", initialized);
    return transition("restore", pid, 2, 1, d);
}
CUresult cuCheckpointProcessUnlock(int pid, PlainArgs *a) {
    if (a && !all_zero(a, sizeof *a)) return INVALID_VALUE;
    return transition("unlock", pid, 1, 0, NULL);
}
