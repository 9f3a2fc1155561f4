/*
 * thaw-cuda: a cuda-checkpoint compatible CLI over the CUDA driver's checkpoint API
 * (cuCheckpointProcess{GetState,GetRestoreThreadId,Lock,Checkpoint,Restore,Unlock}).
 *
 * Built with plain gcc and no CUDA headers: the few types below follow the struct layouts of
 * CUDA 13.0's cuda.h (checked with static asserts), and libcuda.so.1 is loaded with dlopen at run
 * time, so the binary builds and answers --help on machines without a GPU.
 *
 * Exit codes (stable; the TypeScript client maps them):
 *   0 success
 *   1 a CUDA call failed (its error name is printed)
 *   2 usage error
 *   3 libcuda.so.1 cannot be loaded (no NVIDIA driver)
 *   4 the driver lacks a needed symbol (checkpoint API needs R550+, lock timeout R555+)
 *   5 lock timed out (CUDA_ERROR_NOT_READY); the process stays running
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define THAW_CUDA_VERSION "0.1.0"

enum {
    EXIT_OK = 0,
    EXIT_CUDA = 1,
    EXIT_USAGE = 2,
    EXIT_NO_LIBCUDA = 3,
    EXIT_NO_SYMBOL = 4,
    EXIT_LOCK_TIMEOUT = 5,
};

/* ---- CUDA driver API types (layouts from CUDA 13.0 cuda.h) ---- */
typedef int CUresult;
typedef int CUdevice;
typedef uint64_t cuuint64_t;
typedef struct { char bytes[16]; } CUuuid;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NOT_READY 600

typedef enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2,
    CU_PROCESS_STATE_FAILED = 3,
} CUprocessState;

typedef struct {
    unsigned int timeoutMs; /* 0 = no timeout */
    unsigned int reserved0;
    cuuint64_t reserved1[7];
} CUcheckpointLockArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointCheckpointArgs;

typedef struct {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;

typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    cuuint64_t reserved1;
} CUcheckpointRestoreArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUuuid) == 16, "CUuuid layout");
_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "CUcheckpointLockArgs layout");
_Static_assert(sizeof(CUcheckpointCheckpointArgs) == 64, "CUcheckpointCheckpointArgs layout");
_Static_assert(sizeof(CUcheckpointGpuPair) == 32, "CUcheckpointGpuPair layout");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "CUcheckpointRestoreArgs layout");
_Static_assert(__builtin_offsetof(CUcheckpointRestoreArgs, gpuPairsCount) == 8, "gpuPairsCount offset");
_Static_assert(__builtin_offsetof(CUcheckpointRestoreArgs, reserved1) == 56, "reserved1 offset");
_Static_assert(sizeof(CUcheckpointUnlockArgs) == 64, "CUcheckpointUnlockArgs layout");

/* ---- driver entry points, resolved with dlsym ---- */
static struct {
    void *lib;
    CUresult (*init)(unsigned int);
    CUresult (*driverGetVersion)(int *);
    CUresult (*getErrorName)(CUresult, const char **);
    CUresult (*getErrorString)(CUresult, const char **);
    CUresult (*deviceGetCount)(int *);
    CUresult (*deviceGet)(CUdevice *, int);
    CUresult (*deviceGetName)(char *, int, CUdevice);
    CUresult (*deviceTotalMem)(size_t *, CUdevice);
    CUresult (*deviceGetUuid)(CUuuid *, CUdevice);
    CUresult (*deviceGetPCIBusId)(char *, int, CUdevice);
    CUresult (*deviceGetAttribute)(int *, int, CUdevice);
    CUresult (*getState)(int, CUprocessState *);
    CUresult (*getRestoreThreadId)(int, int *);
    CUresult (*lock)(int, CUcheckpointLockArgs *);
    CUresult (*checkpoint)(int, CUcheckpointCheckpointArgs *);
    CUresult (*restore)(int, CUcheckpointRestoreArgs *);
    CUresult (*unlock)(int, CUcheckpointUnlockArgs *);
} cu;

static const char *const checkpoint_symbols[] = {
    "cuCheckpointProcessGetState",   "cuCheckpointProcessGetRestoreThreadId", "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",            "cuCheckpointProcessUnlock",
};
#define N_CHECKPOINT_SYMBOLS (sizeof(checkpoint_symbols) / sizeof(checkpoint_symbols[0]))

static int json_output;
static char dl_error[512];

/* Tries each name in turn (versioned names first) and returns the first symbol found. */
static void *sym(const char *const *names) {
    for (; *names; names++) {
        void *p = dlsym(cu.lib, *names);
        if (p) return p;
    }
    return NULL;
}

#define SYM1(field, a) (*(void **)&cu.field = sym((const char *const[]){a, NULL}))
#define SYM2(field, a, b) (*(void **)&cu.field = sym((const char *const[]){a, b, NULL}))

static int load_libcuda(void) {
    const char *override = getenv("THAW_CUDA_LIBCUDA"); /* tests and odd installs */
    const char *name = override && *override ? override : "libcuda.so.1";
    cu.lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!cu.lib) {
        const char *e = dlerror();
        snprintf(dl_error, sizeof dl_error, "%s", e ? e : "dlopen failed");
        return -1;
    }
    SYM1(init, "cuInit");
    SYM1(driverGetVersion, "cuDriverGetVersion");
    SYM1(getErrorName, "cuGetErrorName");
    SYM1(getErrorString, "cuGetErrorString");
    SYM1(deviceGetCount, "cuDeviceGetCount");
    SYM1(deviceGet, "cuDeviceGet");
    SYM1(deviceGetName, "cuDeviceGetName");
    SYM2(deviceTotalMem, "cuDeviceTotalMem_v2", "cuDeviceTotalMem");
    SYM2(deviceGetUuid, "cuDeviceGetUuid_v2", "cuDeviceGetUuid");
    SYM1(deviceGetPCIBusId, "cuDeviceGetPCIBusId");
    SYM1(deviceGetAttribute, "cuDeviceGetAttribute");
    SYM1(getState, checkpoint_symbols[0]);
    SYM1(getRestoreThreadId, checkpoint_symbols[1]);
    SYM1(lock, checkpoint_symbols[2]);
    SYM1(checkpoint, checkpoint_symbols[3]);
    SYM1(restore, checkpoint_symbols[4]);
    SYM1(unlock, checkpoint_symbols[5]);
    return 0;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static const char *error_name(CUresult r) {
    const char *s = NULL;
    if (cu.getErrorName && cu.getErrorName(r, &s) == CUDA_SUCCESS && s) return s;
    return "CUDA_ERROR_UNKNOWN_CODE";
}

static const char *error_string(CUresult r) {
    const char *s = NULL;
    if (cu.getErrorString && cu.getErrorString(r, &s) == CUDA_SUCCESS && s) return s;
    return "unknown error";
}

static const char *state_name(CUprocessState s) {
    switch (s) {
    case CU_PROCESS_STATE_RUNNING: return "running";
    case CU_PROCESS_STATE_LOCKED: return "locked";
    case CU_PROCESS_STATE_CHECKPOINTED: return "checkpointed";
    case CU_PROCESS_STATE_FAILED: return "failed";
    }
    return "unknown";
}

/* Writes s as a JSON string literal. */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void format_uuid(const CUuuid *u, char out[41]) {
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, 41, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* Parses `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (prefix optional, dashes anywhere). */
static int parse_uuid(const char *s, size_t len, CUuuid *out) {
    if (len >= 4 && strncasecmp(s, "GPU-", 4) == 0) s += 4, len -= 4;
    int n = 0;
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '-') continue;
        int v;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
        else return -1;
        if (n >= 32) return -1;
        out->bytes[n / 2] = (char)(((unsigned char)out->bytes[n / 2]) | (v << ((n % 2) ? 0 : 4)));
        n++;
    }
    return n == 32 ? 0 : -1;
}

/* `OLD=NEW[,OLD=NEW...]` (':' accepted in place of '='). Returns the pair count or -1. */
static int parse_device_map(const char *spec, CUcheckpointGpuPair **pairs_out) {
    int cap = 1;
    for (const char *p = spec; *p; p++) cap += *p == ',';
    CUcheckpointGpuPair *pairs = calloc((size_t)cap, sizeof *pairs);
    if (!pairs) return -1;
    int n = 0;
    const char *p = spec;
    while (*p) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        const char *sep = NULL;
        for (const char *q = p; q < end; q++)
            if (*q == '=' || *q == ':') { sep = q; break; }
        if (!sep || parse_uuid(p, (size_t)(sep - p), &pairs[n].oldUuid) != 0 ||
            parse_uuid(sep + 1, (size_t)(end - sep - 1), &pairs[n].newUuid) != 0) {
            free(pairs);
            return -1;
        }
        n++;
        p = *end ? end + 1 : end;
    }
    if (n == 0) { free(pairs); return -1; }
    *pairs_out = pairs;
    return n;
}

/* ---- reporting ---- */
static const char *prog = "thaw-cuda";

static int report_failure(int exit_code, const char *action, int pid, CUresult r, const char *detail) {
    if (json_output) {
        printf("{\"ok\":false,\"action\":");
        json_str(stdout, action);
        if (pid > 0) printf(",\"pid\":%d", pid);
        if (r != CUDA_SUCCESS) {
            printf(",\"code\":%d,\"error\":", r);
            json_str(stdout, error_name(r));
        }
        printf(",\"message\":");
        json_str(stdout, detail);
        printf(",\"exitCode\":%d}\n", exit_code);
    }
    if (r != CUDA_SUCCESS)
        fprintf(stderr, "%s: could not %s pid %d: %s (%s)%s%s\n", prog, action, pid, error_name(r), error_string(r),
                detail && *detail ? ": " : "", detail ? detail : "");
    else
        fprintf(stderr, "%s: %s%s%s\n", prog, action, detail && *detail ? ": " : "", detail ? detail : "");
    return exit_code;
}

static int need_libcuda(const char *action, int pid) {
    if (cu.lib) return 0;
    if (load_libcuda() != 0) {
        char msg[700];
        snprintf(msg, sizeof msg, "cannot load the NVIDIA driver library (%s); is the NVIDIA driver installed?", dl_error);
        return report_failure(EXIT_NO_LIBCUDA, action, pid, CUDA_SUCCESS, msg);
    }
    return 0;
}

static int need_symbol(void *fn, const char *name, const char *action, int pid) {
    if (fn) return 0;
    char msg[256];
    snprintf(msg, sizeof msg, "the NVIDIA driver lacks %s (checkpointing needs driver R550 or newer)", name);
    return report_failure(EXIT_NO_SYMBOL, action, pid, CUDA_SUCCESS, msg);
}

static void report_ok(const char *action, int pid, const char *state, double ms, double init_ms) {
    if (!json_output) return;
    printf("{\"ok\":true,\"action\":");
    json_str(stdout, action);
    printf(",\"pid\":%d", pid);
    if (state) {
        printf(",\"state\":");
        json_str(stdout, state);
    }
    printf(",\"durationMs\":%.3f", ms);
    if (init_ms >= 0) printf(",\"cuInitMs\":%.3f", init_ms);
    printf("}\n");
}

/* ---- actions ---- */
static int do_get_state(int pid, CUprocessState *out) {
    int rc = need_libcuda("get-state", pid);
    if (rc) return rc;
    if ((rc = need_symbol((void *)cu.getState, checkpoint_symbols[0], "get-state", pid))) return rc;
    CUresult r = cu.getState(pid, out);
    if (r != CUDA_SUCCESS) return report_failure(EXIT_CUDA, "get-state", pid, r, NULL);
    return 0;
}

static int do_lock(int pid, unsigned int timeout_ms) {
    int rc = need_libcuda("lock", pid);
    if (rc) return rc;
    if ((rc = need_symbol((void *)cu.lock, checkpoint_symbols[2], "lock", pid))) return rc;
    CUcheckpointLockArgs args;
    memset(&args, 0, sizeof args);
    args.timeoutMs = timeout_ms;
    CUresult r = cu.lock(pid, &args);
    if (r == CUDA_ERROR_NOT_READY && timeout_ms > 0) {
        char msg[96];
        snprintf(msg, sizeof msg, "lock timed out after %u ms; the process keeps running", timeout_ms);
        return report_failure(EXIT_LOCK_TIMEOUT, "lock", pid, r, msg);
    }
    if (r != CUDA_SUCCESS) return report_failure(EXIT_CUDA, "lock", pid, r, NULL);
    return 0;
}

static int do_checkpoint(int pid) {
    int rc = need_libcuda("checkpoint", pid);
    if (rc) return rc;
    if ((rc = need_symbol((void *)cu.checkpoint, checkpoint_symbols[3], "checkpoint", pid))) return rc;
    CUcheckpointCheckpointArgs args;
    memset(&args, 0, sizeof args);
    CUresult r = cu.checkpoint(pid, &args);
    if (r != CUDA_SUCCESS) return report_failure(EXIT_CUDA, "checkpoint", pid, r, NULL);
    return 0;
}

/* Restore needs persistence mode or an initialized driver in the caller: cuInit(0) first. */
static int do_restore(int pid, CUcheckpointGpuPair *pairs, int npairs, double *init_ms) {
    int rc = need_libcuda("restore", pid);
    if (rc) return rc;
    if ((rc = need_symbol((void *)cu.restore, checkpoint_symbols[4], "restore", pid))) return rc;
    /* THAW_CUDA_NO_INIT=1 skips it (measured: with persistence mode on, cuInit costs 0.1-0.2 s). */
    const char *no_init = getenv("THAW_CUDA_NO_INIT");
    if (cu.init && !(no_init && *no_init == '1')) {
        double t0 = now_ms();
        CUresult ir = cu.init(0);
        if (init_ms) *init_ms = now_ms() - t0;
        /* Not fatal: with persistence mode on, restore works without it; its own error says more. */
        if (ir != CUDA_SUCCESS) fprintf(stderr, "%s: cuInit(0) failed: %s\n", prog, error_name(ir));
    }
    CUcheckpointRestoreArgs args;
    memset(&args, 0, sizeof args);
    if (npairs > 0) {
        args.gpuPairs = pairs;
        args.gpuPairsCount = (unsigned int)npairs;
    }
    CUresult r = cu.restore(pid, &args);
    if (r != CUDA_SUCCESS) return report_failure(EXIT_CUDA, "restore", pid, r, NULL);
    return 0;
}

static int do_unlock(int pid) {
    int rc = need_libcuda("unlock", pid);
    if (rc) return rc;
    if ((rc = need_symbol((void *)cu.unlock, checkpoint_symbols[5], "unlock", pid))) return rc;
    CUcheckpointUnlockArgs args;
    memset(&args, 0, sizeof args);
    CUresult r = cu.unlock(pid, &args);
    if (r != CUDA_SUCCESS) return report_failure(EXIT_CUDA, "unlock", pid, r, NULL);
    return 0;
}

static int do_get_restore_tid(int pid, int *tid) {
    int rc = need_libcuda("get-restore-tid", pid);
    if (rc) return rc;
    if ((rc = need_symbol((void *)cu.getRestoreThreadId, checkpoint_symbols[1], "get-restore-tid", pid))) return rc;
    CUresult r = cu.getRestoreThreadId(pid, tid);
    if (r != CUDA_SUCCESS) return report_failure(EXIT_CUDA, "get-restore-tid", pid, r, "Could not find restore thread");
    return 0;
}

/* Reads the kernel module's version line, e.g. "NVRM version: NVIDIA UNIX ... 580.159.04  Release ...". */
static int kernel_driver_version(char *out, size_t len) {
    FILE *f = fopen("/proc/driver/nvidia/version", "r");
    if (!f) return -1;
    char line[512];
    int found = -1;
    if (fgets(line, sizeof line, f)) {
        /* The version is the first token shaped like digits.digits[.digits]. */
        char *save = NULL;
        for (char *tok = strtok_r(line, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
            if (isdigit((unsigned char)tok[0]) && strchr(tok, '.')) {
                snprintf(out, len, "%s", tok);
                found = 0;
                break;
            }
        }
    }
    fclose(f);
    return found;
}

static int do_probe(void) {
    char kver[64] = "";
    int have_kver = kernel_driver_version(kver, sizeof kver) == 0;
    if (load_libcuda() != 0) {
        /* Always JSON: --probe exists for machines. */
        printf("{\"ok\":false,\"libcuda\":false,\"kernelDriverVersion\":");
        if (have_kver) json_str(stdout, kver);
        else printf("null");
        printf(",\"error\":");
        char msg[700];
        snprintf(msg, sizeof msg, "cannot load the NVIDIA driver library (%s); is the NVIDIA driver installed?", dl_error);
        json_str(stdout, msg);
        printf("}\n");
        fprintf(stderr, "%s: probe: %s\n", prog, msg);
        return EXIT_NO_LIBCUDA;
    }
    int driver_version = 0;
    if (cu.driverGetVersion) cu.driverGetVersion(&driver_version);
    printf("{\"ok\":true,\"libcuda\":true,\"kernelDriverVersion\":");
    if (have_kver) json_str(stdout, kver);
    else printf("null");
    printf(",\"cudaDriverVersion\":%d,\"cudaVersion\":\"%d.%d\"", driver_version, driver_version / 1000,
           (driver_version % 1000) / 10);
    size_t missing = 0;
    printf(",\"missingSymbols\":[");
    for (size_t i = 0; i < N_CHECKPOINT_SYMBOLS; i++) {
        if (!dlsym(cu.lib, checkpoint_symbols[i])) {
            if (missing++) putchar(',');
            json_str(stdout, checkpoint_symbols[i]);
        }
    }
    printf("],\"checkpointApi\":%s", missing == 0 ? "true" : "false");

    double t0 = now_ms();
    CUresult ir = cu.init ? cu.init(0) : -1;
    printf(",\"cuInitMs\":%.3f", now_ms() - t0);
    if (ir != CUDA_SUCCESS) {
        printf(",\"initError\":");
        json_str(stdout, cu.init ? error_name(ir) : "cuInit missing");
        printf(",\"devices\":[]}\n");
        return EXIT_OK; /* the API may still work on other processes; callers read initError */
    }
    printf(",\"initError\":null,\"devices\":[");
    int count = 0;
    if (cu.deviceGetCount) cu.deviceGetCount(&count);
    for (int i = 0; i < count; i++) {
        CUdevice dev;
        if (!cu.deviceGet || cu.deviceGet(&dev, i) != CUDA_SUCCESS) continue;
        char name[256] = "", bus[64] = "", uuid[41] = "";
        size_t mem = 0;
        int major = 0, minor = 0;
        CUuuid u;
        memset(&u, 0, sizeof u);
        if (cu.deviceGetName) cu.deviceGetName(name, sizeof name, dev);
        if (cu.deviceTotalMem) cu.deviceTotalMem(&mem, dev);
        if (cu.deviceGetUuid && cu.deviceGetUuid(&u, dev) == CUDA_SUCCESS) format_uuid(&u, uuid);
        if (cu.deviceGetPCIBusId) cu.deviceGetPCIBusId(bus, sizeof bus, dev);
        if (cu.deviceGetAttribute) {
            cu.deviceGetAttribute(&major, 75 /* COMPUTE_CAPABILITY_MAJOR */, dev);
            cu.deviceGetAttribute(&minor, 76 /* COMPUTE_CAPABILITY_MINOR */, dev);
        }
        if (i) putchar(',');
        printf("{\"index\":%d,\"uuid\":", i);
        json_str(stdout, uuid);
        printf(",\"name\":");
        json_str(stdout, name);
        printf(",\"totalMemoryBytes\":%zu,\"pciBusId\":", mem);
        json_str(stdout, bus);
        printf(",\"computeCapability\":\"%d.%d\"}", major, minor);
    }
    printf("]}\n");
    return EXIT_OK;
}

static void usage(FILE *f) {
    fprintf(f,
            "Usage: %s [--json] COMMAND\n"
            "cuda-checkpoint compatible CLI over the CUDA driver checkpoint API.\n"
            "\n"
            "Commands:\n"
            "  --get-state --pid PID            print running | locked | checkpointed | failed\n"
            "  --action lock --pid PID [--timeout MS]\n"
            "                                   lock the CUDA API (0 = no timeout; on timeout the\n"
            "                                   process keeps running, exit 5)\n"
            "  --action checkpoint --pid PID    move GPU memory into the process, release the GPU\n"
            "  --action restore --pid PID [--device-map OLD=NEW,...]\n"
            "                                   reacquire the GPU(s); the process stays locked\n"
            "  --action unlock --pid PID        let CUDA calls proceed\n"
            "  --toggle --pid PID               running <-> checkpointed in one step\n"
            "  --get-restore-tid --pid PID      print the CUDA restore thread id\n"
            "  --probe                          JSON: driver version, checkpoint API, devices\n"
            "  --version                        print the version\n"
            "\n"
            "Options:\n"
            "  -p, --pid PID\n"
            "  -t, --timeout MS                 lock timeout in milliseconds\n"
            "      --device-map OLD=NEW,...     GPU UUIDs as nvidia-smi prints them (GPU-xxxxxxxx-...)\n"
            "      --json                       one JSON object per command on stdout\n"
            "  -h, --help\n"
            "\n"
            "Exit codes: 0 ok, 1 CUDA error, 2 usage, 3 no libcuda.so.1, 4 driver too old, 5 lock timeout.\n",
            prog);
}

static int parse_int(const char *s, long min, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) return -1;
    *out = v;
    return 0;
}

enum { OPT_GET_STATE = 256, OPT_ACTION, OPT_TOGGLE, OPT_RESTORE_TID, OPT_DEVICE_MAP, OPT_PROBE, OPT_JSON, OPT_VERSION };

int main(int argc, char **argv) {
    static const struct option opts[] = {
        {"get-state", no_argument, NULL, OPT_GET_STATE},
        {"action", required_argument, NULL, OPT_ACTION},
        {"toggle", no_argument, NULL, OPT_TOGGLE},
        {"get-restore-tid", no_argument, NULL, OPT_RESTORE_TID},
        {"device-map", required_argument, NULL, OPT_DEVICE_MAP},
        {"probe", no_argument, NULL, OPT_PROBE},
        {"json", no_argument, NULL, OPT_JSON},
        {"version", no_argument, NULL, OPT_VERSION},
        {"pid", required_argument, NULL, 'p'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int command = 0;
    const char *action = NULL, *device_map = NULL;
    long pid = 0, timeout = 0;
    int have_timeout = 0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":p:t:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_GET_STATE:
        case OPT_TOGGLE:
        case OPT_RESTORE_TID:
        case OPT_PROBE:
        case OPT_ACTION:
            if (command && command != c) {
                fprintf(stderr, "%s: only one command at a time\n", prog);
                return EXIT_USAGE;
            }
            command = c;
            if (c == OPT_ACTION) action = optarg;
            break;
        case OPT_DEVICE_MAP: device_map = optarg; break;
        case OPT_JSON: json_output = 1; break;
        case OPT_VERSION: printf("thaw-cuda %s\n", THAW_CUDA_VERSION); return EXIT_OK;
        case 'p':
            if (parse_int(optarg, 1, INT_MAX, &pid) != 0) {
                fprintf(stderr, "%s: invalid pid '%s'\n", prog, optarg);
                return EXIT_USAGE;
            }
            break;
        case 't':
            if (parse_int(optarg, 0, (long)UINT_MAX, &timeout) != 0) {
                fprintf(stderr, "%s: invalid timeout '%s' (milliseconds)\n", prog, optarg);
                return EXIT_USAGE;
            }
            have_timeout = 1;
            break;
        case 'h': usage(stdout); return EXIT_OK;
        case ':':
            fprintf(stderr, "%s: option '%s' needs a value\n", prog, argv[optind - 1]);
            return EXIT_USAGE;
        default:
            fprintf(stderr, "%s: unknown option '%s' (see --help)\n", prog, argv[optind - 1]);
            return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        return EXIT_USAGE;
    }
    if (!command) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (command == OPT_PROBE) return do_probe();
    if (pid <= 0) {
        fprintf(stderr, "%s: --pid is required\n", prog);
        return EXIT_USAGE;
    }
    if (command == OPT_ACTION && strcmp(action, "lock") && strcmp(action, "checkpoint") && strcmp(action, "restore") &&
        strcmp(action, "unlock")) {
        fprintf(stderr, "%s: unknown action '%s' (lock, checkpoint, restore, unlock)\n", prog, action);
        return EXIT_USAGE;
    }
    int is_restore = command == OPT_TOGGLE || (command == OPT_ACTION && !strcmp(action, "restore"));
    if (device_map && !is_restore) {
        fprintf(stderr, "%s: --device-map applies to restore (and --toggle) only\n", prog);
        return EXIT_USAGE;
    }
    if (have_timeout && !(command == OPT_ACTION && !strcmp(action, "lock"))) {
        fprintf(stderr, "%s: --timeout applies to --action lock only\n", prog);
        return EXIT_USAGE;
    }
    CUcheckpointGpuPair *pairs = NULL;
    int npairs = 0;
    if (device_map) {
        npairs = parse_device_map(device_map, &pairs);
        if (npairs < 0) {
            fprintf(stderr, "%s: invalid --device-map '%s' (want OLD=NEW,... with GPU UUIDs)\n", prog, device_map);
            return EXIT_USAGE;
        }
    }

    int p = (int)pid, rc;
    double t0 = now_ms(), init_ms = -1;
    CUprocessState st;
    switch (command) {
    case OPT_GET_STATE:
        if ((rc = do_get_state(p, &st))) return rc;
        if (json_output) report_ok("get-state", p, state_name(st), now_ms() - t0, -1);
        else printf("%s\n", state_name(st));
        return EXIT_OK;
    case OPT_RESTORE_TID: {
        int tid = 0;
        if ((rc = do_get_restore_tid(p, &tid))) return rc;
        if (json_output) printf("{\"ok\":true,\"action\":\"get-restore-tid\",\"pid\":%d,\"tid\":%d}\n", p, tid);
        else printf("%d\n", tid);
        return EXIT_OK;
    }
    case OPT_TOGGLE:
        if ((rc = do_get_state(p, &st))) return rc;
        if (st == CU_PROCESS_STATE_RUNNING) {
            if ((rc = do_lock(p, 0)) || (rc = do_checkpoint(p))) return rc;
        } else if (st == CU_PROCESS_STATE_CHECKPOINTED) {
            if ((rc = do_restore(p, pairs, npairs, &init_ms)) || (rc = do_unlock(p))) return rc;
        } else {
            char msg[96];
            snprintf(msg, sizeof msg, "cannot toggle a process in state %s", state_name(st));
            return report_failure(EXIT_CUDA, "toggle", p, CUDA_SUCCESS, msg);
        }
        if ((rc = do_get_state(p, &st))) return rc;
        report_ok("toggle", p, state_name(st), now_ms() - t0, init_ms);
        return EXIT_OK;
    default: break;
    }
    if (!strcmp(action, "lock")) rc = do_lock(p, (unsigned int)timeout);
    else if (!strcmp(action, "checkpoint")) rc = do_checkpoint(p);
    else if (!strcmp(action, "restore")) rc = do_restore(p, pairs, npairs, &init_ms);
    else rc = do_unlock(p);
    free(pairs);
    if (rc) return rc;
    report_ok(action, p, NULL, now_ms() - t0, init_ms);
    return EXIT_OK;
}
