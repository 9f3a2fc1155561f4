#!/bin/bash
# The GPU workload in a runc container started, checkpointed and restored through the `thaw` CLI
# (native engine: runc + CRIU, GPU hooks through thaw-cuda). Runs on the GPU machine from the
# repository root after bench/gpu/run-all.sh's prefix set-up, or locally with MODE=cpu.
#
#   bench/gpu/thaw-e2e.sh NODE THAW_JS RUNC CRIU THAW_CUDA PYTHON BINDS MODE GIB OUT
#
# Optional env: KVGIB=N adds an N GiB KV-cache-like buffer; KV=discard frees it before the checkpoint
# (kv-release, as vLLM's /sleep) and re-creates it after the restore (kv-reacquire, as /wake_up), inside
# the timed restore-to-first-request; LAZY=auto|on|off sets the native engine's restore.lazyPages;
# GPUS=N spreads pattern mode's chunks over N GPUs (one process, a CUDA context per GPU); PROCS=N runs
# one process per GPU instead (as tensor parallelism does; more processes than GPUs share them round-robin,
# without NCCL), GIB split evenly; with PROCS, NCCL=1 joins the
# ranks in an NCCL process group that is destroyed before the checkpoint (nccl-down) and formed again after
# the restore (nccl-up, inside the timed restore-to-first-request): the driver does not restore NCCL's peer
# memory (docs/bench/gpu.md, "NCCL");
# DROP=1 drops the page cache before the restore; ENGINE=gvisor runs it under runsc with nvproxy
# (RUNC and CRIU are then unused) — only where runsc's nvproxy supports the host driver.
#
# How the weights get back onto the GPU (ROUTE):
#   driver      (default) they stay on the GPU: the CUDA checkpoint moves them to host memory, the
#               CUDA restore copies them back;
#   park        the app parks them in pageable host memory pinned with cudaHostRegister and frees
#               them on the GPU before the checkpoint (workload `park`); after the restore it copies
#               them back (`unpark`) inside the timed restore-to-first-request;
#   park-unreg  the same, but unregistered before the checkpoint and registered again chunk by chunk
#               by `unpark` (the CUDA restore then has no host registration to re-pin).
# REPS=N restores the one snapshot N times; CACHES="warm cold" (default: cold with DROP=1, else warm)
# gives each repetition's cache states in order (cold = sync + drop_caches first; a token ending in
# -nv, e.g. warm-nv, restores with restore.verify false: no checksums, so `thaw run` returns once the
# pages are in instead of once they are also hashed). The commands a
# restore is timed by (kv-reacquire, unpark, ping) are sent when `thaw run` returns; with QUEUE=1
# they are queued before it starts, so the app runs them the moment it runs (before the CUDA restore
# is done: see docs/bench/gpu.md for what that does to a parked app). PRE="sync ..." queues extra
# commands first. The clock stops at the app's own time of answering `ping`. One RESULT line per
# restore; each restore is checked bit-exact.
set -u
ENGINE=${ENGINE:-native}
NCCL=${NCCL:-0} KV=${KV:-keep} KVGIB=${KVGIB:-0} LAZY=${LAZY:-} ROUTE=${ROUTE:-driver} REPS=${REPS:-1} QUEUE=${QUEUE:-0} PRE=${PRE:-}
CACHES=${CACHES:-$([ "${DROP:-0}" = 1 ] && echo cold || echo warm)}
case "$ROUTE" in driver|park|park-unreg) ;; *) echo "unknown ROUTE $ROUTE"; exit 2 ;; esac
NODE=$1 THAW_JS=$2 RUNC=$3 CRIU=$4 TC=$5 PY=$6 BINDS=$7 MODE=$8 GIB=$9 OUT=${10}
W=/tmp/thaw-e2e; rm -rf "$W"; mkdir -p "$W/ctl" "$W/bundle/rootfs" "$W/bundle/upper" "$W/bundle/work" "$OUT"
ts() { date +%s.%N; }
dt() { python3 -c "print(round($2-$1,3))"; }
seq=0
queue() {  # queue CMD without waiting; its number is left in $n (never in a pipe or $(): seq lives in this shell)
  seq=$((seq + 1)); n=$(printf '%06d' $seq)
  echo "$1" > "$W/ctl/cmd-$n.tmp"; mv "$W/ctl/cmd-$n.tmp" "$W/ctl/cmd-$n"
}
answer() {  # answer N WHAT: waits for the response to command N and prints it
  for _ in $(seq 1 60000); do [ -f "$W/ctl/resp-$1.json" ] && { cat "$W/ctl/resp-$1.json"; echo; return 0; }; sleep 0.005; done
  echo "no answer to $2"; return 1
}
send() {  # send CMD: prints the response JSON
  local n; queue "$1"; answer "$n" "$1"
}
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/bundle/upper,workdir=$W/bundle/work" "$W/bundle/rootfs"
# A failed run must not leave its containers behind (the next case reuses the ids and cgroups).
CUR=gpu2
trap '$T delete --force gpu1 >/dev/null 2>&1; $T delete --force $CUR >/dev/null 2>&1; umount -l "$W/bundle/rootfs" 2>/dev/null' EXIT
trap 'exit 143' TERM
cp bench/gpu/workload.py "$W/workload.py"
cat > "$W/thaw.json" <<JSON
{"stateDir": "$W/state", "store": {"path": "$W/store"}, "engine": "$ENGINE",
 "runsc": {"flags": {"nvproxy": "true", "nvproxy-docker": "true"}},
 "runc": {"path": "$RUNC", "criuPath": "$CRIU", "tcpEstablished": $([ "$NCCL" = 1 ] && echo true || echo false)}, "gpu": {"cudaCheckpointPath": "$TC"}, "restore": {"verify": true${LAZY:+, \"lazyPages\": \"$LAZY\"}}}
JSON
sed 's/"verify": true/"verify": false/' "$W/thaw.json" > "$W/thaw-nv.json"  # for CACHES tokens ending in -nv
# The bundle: an overlay of the host's / (python + torch), the driver and /dev/nvidia* devices. The
# image digest annotation gives the snapshot key an image identity, so no rootfs walk of / is needed.
"$PY" - "$W" "$PY" "$MODE" "$GIB" "$BINDS" "$KVGIB" "$ENGINE" "${GPUS:-1}" "${PROCS:-1}" "$NCCL" <<'PYEOF'
import json, os, stat, sys
w, py, mode, gib, binds, kvgib, engine, gpus, procs, nccl = sys.argv[1:11]
nodes = []
for n in sorted(os.listdir("/dev")):
    p = "/dev/" + n
    if n.startswith("nvidia") and stat.S_ISCHR(os.stat(p).st_mode):
        r = os.stat(p).st_rdev
        nodes.append({"path": p, "type": "c", "major": os.major(r), "minor": os.minor(r), "fileMode": 0o666, "uid": 0, "gid": 0})
env = [f"{k}={v}" for k, v in os.environ.items() if not k.startswith("NODE") and k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")]
env += ["LD_LIBRARY_PATH=/usr/local/nvidia/lib64", "PYTHONUNBUFFERED=1", "NVIDIA_VISIBLE_DEVICES=all"]
env += ["NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"]  # never NVLink multicast
caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_NICE"]
mounts = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=1g"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": w + "/ctl", "type": "bind", "source": w + "/ctl", "options": ["rbind", "rw"]},
]
if os.path.exists("/usr/local/nvidia"):
    mounts.append({"destination": "/usr/local/nvidia", "type": "bind", "source": "/usr/local/nvidia", "options": ["rbind", "ro"]})
for b in filter(None, binds.split(",")):
    mounts.append({"destination": b, "type": "bind", "source": b, "options": ["rbind", "ro"]})
spec = {
    "ociVersion": "1.0.2",
    "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                "args": [py, w + "/workload.py", "--ctl", w + "/ctl", "--mode", mode, "--gib", gib, "--kv-gib", kvgib, "--gpus", gpus, "--procs", procs, "--nccl", nccl],
                "env": env, "cwd": "/tmp", "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": True},
    "root": {"path": "rootfs", "readonly": False},
    "hostname": "thaw-e2e",
    "annotations": {"io.kubernetes.cri.image-name": "localhost/thaw-gpu-e2e@sha256:" + "0" * 63 + "1",
                    "thaw.dev/engine": engine},
    "mounts": mounts,
    "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
              "devices": nodes,
              "resources": {"devices": [{"allow": False, "access": "rwm"}] + [{"allow": True, "type": "c", "major": n["major"], "minor": n["minor"], "access": "rwm"} for n in nodes]}},
}
if nccl == "1":
    # The ranks' loopback TCP connections are dumped (runc.tcpEstablished); CRIU then locks the network
    # with iptables, which this host lacks: runc's per-container CRIU config skips the lock (both
    # ends of every connection are frozen in the same dump).
    with open(w + "/criu.conf", "w") as f:
        f.write("network-lock skip\n")
    spec["annotations"]["org.criu.config"] = w + "/criu.conf"
json.dump(spec, open(w + "/bundle/config.json", "w"), indent=1)
PYEOF
T="$NODE $THAW_JS --config $W/thaw.json --json --log-level warn"
wait_ready() { for _ in $(seq 1 24000); do grep -q '"ready"' "$W/ctl/events.jsonl" 2>/dev/null && return 0; sleep 0.005; done; return 1; }

echo "=== cold start through thaw ($MODE, $GIB GiB)"
t0=$(ts); $T run --bundle "$W/bundle" --id gpu1 --detach --output "$W/c1.log" | tee "$OUT/thaw-run-cold.json"
wait_ready || { cat "$W/c1.log"; exit 1; }; t1=$(ts); echo "cold start to ready: $(dt $t0 $t1) s"
send ping; send verify > "$OUT/verify-before.json"; cat "$OUT/verify-before.json"
if [ "$KV" = discard ]; then echo "=== kv-release before the checkpoint"; send kv-release > "$OUT/kv-release.json"; cat "$OUT/kv-release.json"; fi
if [ "$NCCL" = 1 ]; then
  echo "=== nccl-down: the process group destroyed before the checkpoint"
  send nccl-down > "$OUT/nccl-down.json"; cat "$OUT/nccl-down.json"
  grep -q '"ok": true' "$OUT/nccl-down.json" || exit 1
fi
if [ "$ROUTE" != driver ]; then
  echo "=== $ROUTE: weights to pinned host memory before the checkpoint"
  send "$ROUTE" > "$OUT/park.json"; cat "$OUT/park.json"
  grep -q '"ok": true' "$OUT/park.json" || exit 1
fi
echo "=== thaw checkpoint"
t2=$(ts); $T checkpoint gpu1 | tee "$OUT/thaw-checkpoint.json"; t3=$(ts); echo "checkpoint: $(dt $t2 $t3) s"
$T delete --force gpu1; sleep 1
# HANG_DUMP_S=N: N s into a restore that has not returned, write what every process of it is doing to
# $OUT/hang-CUR.txt (with RESTORE_TIMEOUT_S=M, `thaw run` is stopped after M s and the script goes on).
hang_dump() {
  echo "=== $(date +%T) processes"; ps -eo pid,ppid,stat,wchan:32,etime,args --forest | grep -v ' \[' | cut -c1-220
  for p in $(pgrep -f 'criu|runc|thaw|workload|cuda|python'); do
    echo "=== $p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | cut -c1-160)"
    grep -E '^(State|Threads)' /proc/$p/status 2>/dev/null
    for t in /proc/$p/task/*; do echo "-- $(basename $t) $(cat $t/comm) $(cat $t/wchan 2>/dev/null)"; head -8 $t/stack 2>/dev/null; done | head -60
  done
  # The page server's side: every thread of thaw (libuv's pool workers included) with what it waits
  # in; every userfaultfd thaw holds, with the faults queued on it (fdinfo "pending"); the
  # container's tasks with the syscall each is in (number and arguments).
  for p in $(pgrep -f 'thaw\.js|page-keeper'); do
    for t in /proc/$p/task/*; do
      echo "-- thread $p/$(basename $t) $(cat $t/comm) $(cat $t/wchan 2>/dev/null) syscall: $(cut -d' ' -f1-3 $t/syscall 2>/dev/null)"
      grep -v '^\[<0>\] \(entry_SYSCALL\|do_syscall_64\|x64_sys_call\)' $t/stack 2>/dev/null | head -6
    done
    for fd in /proc/$p/fd/*; do
      target=$(readlink "$fd" 2>/dev/null)
      case "$target" in
        *userfaultfd*) echo "-- uffd $p/${fd##*/}: $(tr '\n' ' ' < /proc/$p/fdinfo/${fd##*/})" ;;
        *) echo "-- fd $p/${fd##*/} -> $target" ;;
      esac
    done
  done
  for p in $(pgrep -f 'python|workload'); do
    for t in /proc/$p/task/*; do echo "-- syscall $p/$(basename $t): $(cat $t/syscall 2>/dev/null)"; done | head -8
  done
  echo "=== CRIU logs"
  for f in $(find "$W/state" -name '*.log' -newer "$OUT/thaw-checkpoint.json" 2>/dev/null); do
    echo "--- $f"; grep -nE 'lazy|uffd|Sending PID|zombie|rseq|Error|fail' "$f" | tail -80; tail -40 "$f"
    gzip -c "$f" > "$OUT/hang-$CUR-$(basename "$f").gz"
  done
  echo "=== thaw run log"; tail -c 12000 "$OUT/thaw-run-$CUR.log"
  echo "=== app output"; tail -20 "$W/$CUR.log" 2>/dev/null
  echo "=== nvidia-smi"; nvidia-smi 2>&1 | head -40
  echo "=== dmesg"; dmesg 2>&1 | tail -20
}
failed=0
for r in $(seq 1 "$REPS"); do
  for cache in $CACHES; do
    CUR=r$r-$cache
    verify=1 cfg=$W/thaw.json
    case "$cache" in *-nv) verify=0 cfg=$W/thaw-nv.json ;; esac
    level=info; [ -n "${HANG_DUMP_S:-}" ] && level=debug # a hang dump wants the page server's debug lines
    TI="$NODE $THAW_JS --config $cfg --json --log-level $level"
    case "$cache" in cold*) sync; echo 3 > /proc/sys/vm/drop_caches; echo "page cache dropped" ;; esac
    echo "=== thaw run again: restore $CUR ($ROUTE, $cache cache)"
    : > "$W/ctl/events.jsonl"
    nkv= nun= nnccl=
    timed() {  # the commands a restore is timed by
      local c; for c in $PRE; do queue "$c"; done
      [ "$KV" = discard ] && { queue kv-reacquire; nkv=$n; }
      [ "$ROUTE" != driver ] && { queue unpark; nun=$n; }
      [ "$NCCL" = 1 ] && { queue nccl-up; nnccl=$n; }
      queue ping; nping=$n
    }
    [ "$QUEUE" = 1 ] && timed
    dumper=
    [ -n "${HANG_DUMP_S:-}" ] && { (sleep "$HANG_DUMP_S"; hang_dump > "$OUT/hang-$CUR.txt" 2>&1) & dumper=$!; }
    t4=$(ts); ${RESTORE_TIMEOUT_S:+timeout $RESTORE_TIMEOUT_S} $TI run --bundle "$W/bundle" --id "$CUR" --detach --output "$W/$CUR.log" > "$OUT/thaw-run-$CUR.json" 2> "$OUT/thaw-run-$CUR.log"; rc=$?; t5=$(ts)
    [ -n "$dumper" ] && kill "$dumper" 2>/dev/null
    [ "$QUEUE" = 1 ] || timed
    if [ "$rc" != 0 ]; then
      echo "=== thaw run $CUR failed (rc $rc)"; cat "$OUT/thaw-run-$CUR.json"; tail -c 3000 "$OUT/thaw-run-$CUR.log"; failed=1; break 2
    fi
    cat "$OUT/thaw-run-$CUR.json"; [ -f "$OUT/thaw-run-restore.json" ] || cp "$OUT/thaw-run-$CUR.json" "$OUT/thaw-run-restore.json"
    grep -E '"(native restore done|anonymous memory restored by the page server|restore failed, cold start)"' "$OUT/thaw-run-$CUR.log" | cut -c1-600
    [ -n "$nkv" ] && answer "$nkv" kv-reacquire > "$OUT/kv-reacquire-$CUR.json"
    [ -n "$nun" ] && { answer "$nun" unpark > "$OUT/unpark-$CUR.json"; cat "$OUT/unpark-$CUR.json"; }
    [ -n "$nnccl" ] && { answer "$nnccl" nccl-up > "$OUT/nccl-up-$CUR.json"; cat "$OUT/nccl-up-$CUR.json"; }
    answer "$nping" ping > "$OUT/ping-$CUR.json"; cat "$OUT/ping-$CUR.json"
    send verify > "$OUT/verify-$CUR.json"; cat "$OUT/verify-$CUR.json"
    [ "$ROUTE" != driver ] && { send park-free > "$OUT/park-free-$CUR.json"; cat "$OUT/park-free-$CUR.json"; }
    [ -f "$OUT/verify-after.json" ] || cp "$OUT/verify-$CUR.json" "$OUT/verify-after.json"
    "$PY" - "$OUT" "$CUR" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "MODE=$MODE GIB=$GIB KVGIB=$KVGIB KV=$KV LAZY=${LAZY:-default} ROUTE=$ROUTE CACHE=${cache%-nv} REP=$r QUEUE=$QUEUE VERIFY=$verify NCCL=$NCCL PROCS=${PROCS:-1}" <<'PYEOF'
import json, os, sys
out, cur = sys.argv[1], sys.argv[2]
t0, t1, t2, t3, t4, t5 = map(float, sys.argv[3:9])
fields = dict(kv.split("=", 1) for kv in sys.argv[9].split())
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return {}
run, ping, ver, ck = load(f"thaw-run-{cur}.json"), load(f"ping-{cur}.json"), load(f"verify-{cur}.json"), load("thaw-checkpoint.json")
unpark, park, free = load(f"unpark-{cur}.json"), load("park.json"), load(f"park-free-{cur}.json")
timings = run.get("timings", {})
engine_t = {}  # the native engine's own phases (info log): runc-restore(-lazy), gpu-restore, lazy-pages, ...
try:
    for line in open(os.path.join(out, f"thaw-run-{cur}.log")):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "native restore done":
            engine_t = rec.get("timings", {})
except OSError:
    pass
ms = lambda k: round(engine_t[k]) if isinstance(engine_t.get(k), (int, float)) else None
restored = run.get("decision") == "restore" and not run.get("fallback")
r = lambda x: round(x, 3)
res = {
    "mode": fields["MODE"], "gib": fields["GIB"], "kvgib": fields["KVGIB"], "kv": fields["KV"], "lazy": fields["LAZY"],
    "route": fields["ROUTE"], "cache": fields["CACHE"], "rep": fields["REP"], "queue": fields["QUEUE"], "verify": fields["VERIFY"], "id": cur,
    "decision": run.get("decision"), "restored": restored,
    "image_bytes": ck.get("bytes"), "bit_exact": bool(ver.get("ok")) and restored,
    "cold_to_ready": r(t1 - t0), "park": park.get("s"), "checkpoint": r(t3 - t2),
    "thaw_run_restore": r(t5 - t4),
    "restore_ms": timings.get("restore"), "stage_ms": timings.get("stage"),
    "runc_restore_ms": ms("runc-restore-lazy") or ms("runc-restore"), "gpu_restore_ms": ms("gpu-restore"),
    "lazy_pages_ms": ms("lazy-pages"), "lazy_fill_ms": ms("lazy-fill"),
    "weights_on_gpu": r(unpark["tDone"] - t4) if "tDone" in unpark else None,
    "unpark_s": unpark.get("s"), "unpark_cuda_wait": unpark.get("cudaWaitS"), "unpark_copy": unpark.get("copyS"),
    "unpark_touch": unpark.get("touchS"), "unpark_register": unpark.get("registerS"),
    "park_free": (free.get("unregisterS") or 0) + (free.get("unmapS") or 0) if free else None,
    "restore_to_first_request": r(ping["tDone"] - t4) if "tDone" in ping else None,
}
if not restored:
    res["reason"] = run.get("reason")
print("RESULT " + " ".join(f"{k}={v}" for k, v in res.items() if k != "reason") + (f" reason={json.dumps(res['reason'])}" if "reason" in res else ""))
with open(os.path.join(out, "results.jsonl"), "a") as f:
    f.write(json.dumps(res) + "\n")
PYEOF
    grep -q '"decision":"restore"' "$OUT/thaw-run-$CUR.json" && grep -q '"fallback":null' "$OUT/thaw-run-$CUR.json" || failed=1
    grep -q '"ok": true' "$OUT/verify-$CUR.json" || failed=1
    send exit > /dev/null; sleep 0.3; $T delete --force "$CUR"; sleep 1
    tail -3 "$W/$CUR.log"
    if [ "$failed" = 1 ]; then
      echo "=== restore $CUR failed or not bit-exact: no more repetitions. The app's output:"
      cat "$W/$CUR.log" | tail -40; echo "=== kernel log:"; dmesg 2>&1 | tail -25
      break 2
    fi
  done
done
$T ps | tee "$OUT/thaw-ps.json"
exit $failed
