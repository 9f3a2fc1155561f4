#!/bin/bash
# One device call of thaw's GPU benchmarks, run from the repository root on the GPU machine:
#
#   bench/gpu/run-all.sh smoke          environment probe, prefixes, thaw-cuda build + probe, a host-process
#                                       flow (thaw-cuda + CRIU, platform.md's sequence) and short container flows
#   bench/gpu/run-all.sh thaw           the workload through the thaw CLI (GIBS, default "1 8")
#   bench/gpu/run-all.sh full CASES     the container flows of bench/gpu/flow.ts for the cases (JSON)
#
# Needs .gpu/ (carried): debs/ (criu + six trixie libs, runc 1.1.5), node.xz, node_modules.tgz and
# app/dist (this checkout compiled with `npx tsc -p . --outDir .gpu/app/dist`). Results under $OUT.
set -u
MODE=${1:-smoke}
CASES=${2:-}
BUDGET_S=${BUDGET_S:-420}
OUT=${OUT:-/tmp/thaw-out}
REPO=$(pwd)
W=/tmp/thaw-gpu
P=$W/prefix
NODE=$W/node/node
TC=$REPO/native/cuda/thaw-cuda
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/run.log") 2>&1
step() { echo "=== $(date +%T.%3N) $*"; }
ts() { date +%s.%N; }
dt() { python3 -c "print(round($2-$1,3))"; }

step "environment ($MODE)"
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total,memory.used,persistence_mode --format=csv
head -1 /proc/driver/nvidia/version
for f in /proc/driver/nvidia/gpus/*/information; do echo "$f"; cat "$f"; done
ls -la /dev/nvidia* 2>&1 | head -20
for b in node runc criu xz python3; do printf '%s: %s\n' "$b" "$(command -v $b || echo none)"; done
uname -r; nproc; free -g | head -2; df -h /tmp /dev/shm | tail -2
cat /sys/kernel/mm/transparent_hugepage/enabled; stat -fc %T /sys/fs/cgroup
findmnt -no SOURCE,FSTYPE / ; findmnt -no SOURCE,FSTYPE /tmp || true

step "prefix: criu (from .gpu/debs) + runc 1.1.5"
rm -rf "$P"; mkdir -p "$P"
for d in .gpu/debs/*.deb; do dpkg -x "$d" "$P"; done
cat > "$P/criu.sh" <<EOF
#!/bin/sh
# trixie's criu with its six trixie-only libraries; everything else from the host.
LD_LIBRARY_PATH=$P/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $P/usr/sbin/criu "\$@"
EOF
chmod +x "$P/criu.sh"
CRIU=$P/criu.sh
RUNC=$P/usr/sbin/runc
$CRIU --version | head -2; $CRIU check 2>&1 | tail -2; $RUNC --version | head -1

step "node + compiled thaw"
python3 - <<EOF
import lzma, shutil, os
os.makedirs("$W/node", exist_ok=True)
with lzma.open(".gpu/node.xz") as src, open("$NODE", "wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
os.chmod("$NODE", 0o755)
EOF
rm -rf "$W/app"; mkdir -p "$W/app"
tar -xzf .gpu/node_modules.tgz -C "$W/app"
cp -r .gpu/app/dist "$W/app/dist"
echo '{"type":"module"}' > "$W/app/package.json"
$NODE --version

step "build thaw-cuda"
make -s -C native/cuda && $TC --version
$TC --probe; echo "probe rc=$?"

mkdir -p "$W/flows/data"
cp bench/gpu/workload.py "$W/flows/data/workload.py"
PY=$(command -v python3)
# Mounts the container's overlay of / would not show (python, torch, CUDA libraries elsewhere).
BINDS=$("$PY" - <<'EOF'
import os, subprocess, sys, torch
paths = {os.path.dirname(sys.executable), os.path.realpath(sys.executable), os.path.dirname(torch.__file__), sys.prefix}
tops = set()
for p in paths:
    t = subprocess.run(["findmnt", "-no", "TARGET", "-T", p], capture_output=True, text=True).stdout.strip()
    if t and t != "/" and not t.startswith(("/proc", "/sys", "/dev", "/usr/local/nvidia", "/tmp")):
        tops.add(t)
print(",".join(sorted(tops)))
EOF
)
echo "python: $PY extra binds: [$BINDS]"

run_flow() {  # $1 = cases JSON, $2 = budget seconds
  step "container flows: $1"
  $NODE "$W/app/dist/bench/gpu/flow.js" --out "$OUT" --work "$W/flows" --runc "$RUNC" --criu "$CRIU" \
    --thaw-cuda "$TC" --python "$PY" --workload "$W/flows/data/workload.py" --binds "$BINDS" --budget-s "$2" --cases "$1"
  echo "flow rc=$?"
}

# ---- host-process smoke flow: platform.md's exact sequence, with thaw-cuda ----
smoke_host() {
  local S=$W/smoke; rm -rf "$S"; mkdir -p "$S/ctl" "$S/img"
  local seq=0
  send() {  # send CMD: prints the response JSON
    seq=$((seq + 1)); local n; n=$(printf '%06d' $seq)
    echo "$1" > "$S/ctl/cmd-$n.tmp"; mv "$S/ctl/cmd-$n.tmp" "$S/ctl/cmd-$n"
    for _ in $(seq 1 30000); do [ -f "$S/ctl/resp-$n.json" ] && { cat "$S/ctl/resp-$n.json"; echo; return 0; }; sleep 0.01; done
    echo "no answer to $1"; return 1
  }
  step "smoke: host process, 1 GiB"
  local t0; t0=$(ts)
  setsid "$PY" bench/gpu/workload.py --ctl "$S/ctl" --mode pattern --gib 1 </dev/null >"$S/wl.log" 2>&1 &
  local PID=$!
  for _ in $(seq 1 1200); do grep -q '"ready"' "$S/ctl/events.jsonl" 2>/dev/null && break; sleep 0.05; done
  cat "$S/ctl/events.jsonl" || { cat "$S/wl.log"; return 1; }
  echo "ready after $(dt "$t0" "$(ts)") s"; send verify
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv
  $TC --get-state -p $PID; $TC --get-restore-tid -p $PID
  local a b c d e f
  a=$(ts); $TC --json --action lock -p $PID --timeout 10000; b=$(ts)
  $TC --json --action checkpoint -p $PID; c=$(ts)
  $TC --get-state -p $PID
  echo "nvidia fds after checkpoint: $(ls -l /proc/$PID/fd | grep -c nvidia)"; grep -E 'RssAnon' /proc/$PID/status
  $CRIU dump -t $PID -D "$S/img" --shell-job -o dump.log; echo "dump rc=$?"; d=$(ts)
  wait $PID 2>/dev/null; sleep 1
  du -sh "$S/img"
  e=$(ts); $CRIU restore -D "$S/img" --shell-job --restore-detached -o restore.log; echo "restore rc=$?"; f=$(ts)
  tail -3 "$S/img/restore.log"
  local g h uuid
  uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
  # An identity device map exercises the CUcheckpointGpuPair layout against the real driver.
  $TC --json --action restore -p $PID --device-map "$uuid=$uuid"; g=$(ts)
  $TC --json --action unlock -p $PID; h=$(ts)
  send ping
  local i; i=$(ts)
  send verify
  echo "SMOKE lock=$(dt $a $b) checkpoint=$(dt $b $c) criu_dump=$(dt $c $d) criu_restore=$(dt $e $f) cuda_restore=$(dt $f $g) unlock=$(dt $g $h) restore_to_serving=$(dt $e $i)"
  step "smoke: toggle twice on the restored process"
  $TC --json --toggle -p $PID; $TC --get-state -p $PID; $TC --json --toggle -p $PID; $TC --get-state -p $PID
  send verify
  send exit; sleep 0.5; kill -9 $PID 2>/dev/null
  rm -rf "$S/img"
}

case "$MODE" in
  thaw)  # the workload started, checkpointed and restored through the thaw CLI (native engine)
    # Native addons built on the dev machine (.gpu/native: thaw_io + thaw_uffd + binding.gyp markers, and
    # the Debian liburing/libaio/libxxhash they link): without them thaw falls back to TypeScript I/O and
    # the plain CRIU restore.
    if [ -d .gpu/native ]; then cp -r .gpu/native "$W/app/native"; export LD_LIBRARY_PATH=$W/app/native/lib; fi
    # A build carried with the checkout (native/build, native/uffd/build) wins over .gpu/native's: a
    # stale .gpu copy once ran every GPU lazy restore on an addon two fixes old.
    for addon in build/Release/thaw_io.node uffd/build/Release/thaw_uffd.node; do
      [ -f "native/$addon" ] && mkdir -p "$(dirname "$W/app/native/$addon")" && cp "native/$addon" "$W/app/native/$addon"
      [ -f "$W/app/native/$addon" ] && echo "addon $addon: $(date -r "$W/app/native/$addon" +%FT%T) $(sha256sum < "$W/app/native/$addon" | cut -c1-12)"
    done
    # THAW_CASES: space-separated GIB[:KVGIB[:KV[:LAZY[:DROP[:ROUTE[:QUEUE[:PRE]]]]]]], e.g. "16.4 16.4:0:keep:off
    # 8:8:discard" or "8:0:keep:auto:0:park" (ROUTE driver|park|park-unreg, QUEUE 0|1, PRE commands joined
    # by '+': see thaw-e2e.sh). REPS, CACHES pass through to thaw-e2e.sh (restores per snapshot, cache
    # states); CASE_TIMEOUT_S bounds each case (default 280).
    for c in ${THAW_CASES:-${GIBS:-1 8}}; do
      IFS=: read -r gib kvgib kv lazy drop route queue pre <<< "$c"
      step "thaw e2e: pattern $gib GiB, kv ${kvgib:-0} GiB ${kv:-keep}, lazy pages ${lazy:-default}, drop ${drop:-0}, route ${route:-driver}, queue ${queue:-0} ${pre:-}, reps ${REPS:-1} x ${CACHES:-default}"
      KVGIB=${kvgib:-0} KV=${kv:-keep} LAZY=${lazy:-} DROP=${drop:-0} ROUTE=${route:-driver} QUEUE=${queue:-0} PRE=${pre//+/ } timeout "${CASE_TIMEOUT_S:-280}" bash bench/gpu/thaw-e2e.sh "$NODE" "$W/app/dist/src/cli/thaw.js" \
        "$RUNC" "$CRIU" "$TC" "$PY" "$BINDS" pattern "$gib" "$OUT/e2e-${c//:/-}"
      rc=$?
      if [ "$rc" != 0 ]; then
        echo "thaw e2e $c FAILED rc=$rc"
        pkill -9 -f '[w]orkload\.py'; sleep 1  # what a killed case left (its trap deletes the containers)
      fi
    done
    ;;
  smoke)
    smoke_host || echo "SMOKE FAILED"
    step "weights for a small qwen-shaped run"
    python3 bench/gpu/make-weights.py $((1 << 30)) "$W/flows/data/weights-1g.bin"
    run_flow '[{"name":"p1","mode":"pattern","gib":1,"reps":1,"coldStarts":true,"kinds":["thaw","naive"],"caches":["cold","warm"]},
               {"name":"q1","mode":"qwen","gib":0,"weights":"'"$W"'/flows/data/weights-1g.bin","kvGib":0.5,"reps":1,"coldStarts":true,"kinds":["thaw"],"caches":["warm"]}]' "$BUDGET_S"
    ;;
  full)
    if echo "$CASES" | grep -q weights-16g; then
      step "weights: 16.4 GB"
      t=$(ts); python3 bench/gpu/make-weights.py 16400000000 "$W/flows/data/weights-16g.bin" 12; echo "made in $(dt "$t" "$(ts)") s"
    fi
    if [ -n "${THP:-}" ]; then  # a host memory setting (not the GPU's); restored below
      thp_was=$(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled)
      echo "$THP" > /sys/kernel/mm/transparent_hugepage/enabled; cat /sys/kernel/mm/transparent_hugepage/enabled
    fi
    run_flow "$CASES" "$BUDGET_S"
    [ -n "${thp_was:-}" ] && echo "$thp_was" > /sys/kernel/mm/transparent_hugepage/enabled
    ;;
esac
step "done"
df -h /tmp | tail -1
