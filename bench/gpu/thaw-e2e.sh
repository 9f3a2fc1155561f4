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
# DROP=1 drops the page cache before the restore; ENGINE=gvisor runs it under runsc with nvproxy
# (RUNC and CRIU are then unused) — only where runsc's nvproxy supports the host driver.
set -u
ENGINE=${ENGINE:-native}
KV=${KV:-keep} KVGIB=${KVGIB:-0} LAZY=${LAZY:-}
NODE=$1 THAW_JS=$2 RUNC=$3 CRIU=$4 TC=$5 PY=$6 BINDS=$7 MODE=$8 GIB=$9 OUT=${10}
W=/tmp/thaw-e2e; rm -rf "$W"; mkdir -p "$W/ctl" "$W/bundle/rootfs" "$W/bundle/upper" "$W/bundle/work" "$OUT"
ts() { date +%s.%N; }
dt() { python3 -c "print(round($2-$1,3))"; }
seq=0
send() {  # send CMD: prints the response JSON (never in a pipe: seq lives in this shell)
  seq=$((seq + 1)); local n; n=$(printf '%06d' $seq)
  echo "$1" > "$W/ctl/cmd-$n.tmp"; mv "$W/ctl/cmd-$n.tmp" "$W/ctl/cmd-$n"
  for _ in $(seq 1 60000); do [ -f "$W/ctl/resp-$n.json" ] && { cat "$W/ctl/resp-$n.json"; echo; return 0; }; sleep 0.005; done
  echo "no answer to $1"; return 1
}
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/bundle/upper,workdir=$W/bundle/work" "$W/bundle/rootfs"
# A failed run must not leave its containers behind (the next case reuses the ids and cgroups).
trap '$T delete --force gpu1 >/dev/null 2>&1; $T delete --force gpu2 >/dev/null 2>&1; umount -l "$W/bundle/rootfs" 2>/dev/null' EXIT
cp bench/gpu/workload.py "$W/workload.py"
cat > "$W/thaw.json" <<JSON
{"stateDir": "$W/state", "store": {"path": "$W/store"}, "engine": "$ENGINE",
 "runsc": {"flags": {"nvproxy": "true", "nvproxy-docker": "true"}},
 "runc": {"path": "$RUNC", "criuPath": "$CRIU"}, "gpu": {"cudaCheckpointPath": "$TC"}, "restore": {"verify": true${LAZY:+, \"lazyPages\": \"$LAZY\"}}}
JSON
# The bundle: an overlay of the host's / (python + torch), the driver and /dev/nvidia* devices. The
# image digest annotation gives the snapshot key an image identity, so no rootfs walk of / is needed.
"$PY" - "$W" "$PY" "$MODE" "$GIB" "$BINDS" "$KVGIB" "$ENGINE" <<'PYEOF'
import json, os, stat, sys
w, py, mode, gib, binds, kvgib, engine = sys.argv[1:8]
nodes = []
for n in sorted(os.listdir("/dev")):
    p = "/dev/" + n
    if n.startswith("nvidia") and stat.S_ISCHR(os.stat(p).st_mode):
        r = os.stat(p).st_rdev
        nodes.append({"path": p, "type": "c", "major": os.major(r), "minor": os.minor(r), "fileMode": 0o666, "uid": 0, "gid": 0})
env = [f"{k}={v}" for k, v in os.environ.items() if not k.startswith("NODE") and k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")]
env += ["LD_LIBRARY_PATH=/usr/local/nvidia/lib64", "PYTHONUNBUFFERED=1", "NVIDIA_VISIBLE_DEVICES=all"]
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
                "args": [py, w + "/workload.py", "--ctl", w + "/ctl", "--mode", mode, "--gib", gib, "--kv-gib", kvgib],
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
json.dump(spec, open(w + "/bundle/config.json", "w"), indent=1)
PYEOF
T="$NODE $THAW_JS --config $W/thaw.json --json --log-level warn"
wait_ready() { for _ in $(seq 1 24000); do grep -q '"ready"' "$W/ctl/events.jsonl" 2>/dev/null && return 0; sleep 0.005; done; return 1; }

echo "=== cold start through thaw ($MODE, $GIB GiB)"
t0=$(ts); $T run --bundle "$W/bundle" --id gpu1 --detach --output "$W/c1.log" | tee "$OUT/thaw-run-cold.json"
wait_ready || { cat "$W/c1.log"; exit 1; }; t1=$(ts); echo "cold start to ready: $(dt $t0 $t1) s"
send ping; send verify > "$OUT/verify-before.json"; cat "$OUT/verify-before.json"
if [ "$KV" = discard ]; then echo "=== kv-release before the checkpoint"; send kv-release > "$OUT/kv-release.json"; cat "$OUT/kv-release.json"; fi
echo "=== thaw checkpoint"
t2=$(ts); $T checkpoint gpu1 | tee "$OUT/thaw-checkpoint.json"; t3=$(ts); echo "checkpoint: $(dt $t2 $t3) s"
$T delete --force gpu1; sleep 1
[ "${DROP:-0}" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; echo "page cache dropped"; }
echo "=== thaw run again: restore"
: > "$W/ctl/events.jsonl"
t4=$(ts); $T run --bundle "$W/bundle" --id gpu2 --detach --output "$W/c2.log" | tee "$OUT/thaw-run-restore.json"; t5=$(ts)
[ "$KV" = discard ] && send kv-reacquire > "$OUT/kv-reacquire.json"
send ping > "$OUT/ping-after.json"; t6=$(ts); cat "$OUT/ping-after.json"
send verify > "$OUT/verify-after.json"; cat "$OUT/verify-after.json"
bytes=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("bytes"))' "$OUT/thaw-checkpoint.json" 2>/dev/null)
ok=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ok"))' "$OUT/verify-after.json" 2>/dev/null)
echo "RESULT mode=$MODE gib=$GIB kvgib=$KVGIB kv=$KV lazy=${LAZY:-default} drop=${DROP:-0} image_bytes=$bytes bit_exact=$ok cold_to_ready=$(dt $t0 $t1) checkpoint=$(dt $t2 $t3) thaw_run_restore=$(dt $t4 $t5) restore_to_first_request=$(dt $t4 $t6)"
$T ps | tee "$OUT/thaw-ps.json"
send exit; sleep 0.3; $T delete --force gpu2
cat "$W/c2.log" | tail -5
