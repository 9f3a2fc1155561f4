#!/bin/bash
# Issue 7's last benchmark: two ways of getting a model's weights back onto the GPU after a thaw
# restore (native engine: runc + CRIU + thaw's lazy page server), measured in one device call:
#   driver      the weights stay on the GPU; the CUDA checkpoint/restore moves them;
#   park        the app parks them in pageable host memory pinned with cudaHostRegister before the
#               checkpoint and copies them back after the restore;
#   park-unreg  the same, unregistered before the checkpoint, registered again after the restore.
# A route is ROUTE[:LAZY[:QUEUE[:PRE]]]: "park:off" restores without lazy pages, "park:auto:1" queues
# the timed commands before `thaw run` starts, "driver:auto:1:sync" queues a bare CUDA call first
# (thaw-e2e.sh's QUEUE and PRE; PRE commands joined by '+').
#
#   GIB=8 REPS=3 CACHES="warm cold" bash bench/gpu/park-vs-driver.sh ["driver park park-unreg park:off"]
#
# On the GPU machine from the repository root, `.gpu` and `native/uffd/build` carried (run-all.sh's
# header). Writes $OUT/run.log (RESULT lines), $OUT/summary.md (bench/gpu/summarize.py's tables) and
# $OUT/cases.tgz (every case's JSON answers and thaw logs: at most 8 files come back from a call);
# PACK=0 leaves them unpacked (for a second invocation in the same call).
set -u
OUT=${OUT:-/tmp/thaw-out}
export OUT
GIB=${GIB:-8} LAZY=${LAZY:-auto}
cases=
for r in ${1:-driver park park-unreg}; do
  IFS=: read -r route lazy queue pre <<< "$r"
  cases+=" $GIB:0:keep:${lazy:-$LAZY}:0:$route:${queue:-0}:${pre:-}"
done
THAW_CASES="$cases" timeout "${TOTAL_S:-540}" bash bench/gpu/run-all.sh thaw
echo "run-all rc=$?"
pkill -9 -f '[w]orkload\.py'
[ "${PACK:-1}" = 1 ] || exit 0
python3 bench/gpu/summarize.py "$OUT/run.log" | tee "$OUT/summary.md"
cd "$OUT" && tar -czf /tmp/park-cases.tgz --exclude=run.log --exclude=summary.md . &&
  find . -mindepth 1 -maxdepth 1 ! -name run.log ! -name summary.md -exec rm -rf {} + && mv /tmp/park-cases.tgz cases.tgz
ls -la "$OUT"
