#!/bin/bash
# Where `runsc restore` spends its time: the sentry's own "Memory files load took" (runsc debug log)
# against the whole restore, for an app with MIB MiB of touched memory, image in the page cache.
#   bash bench/cpu-restore/runsc-load-split.sh [MIB=1024] [RUNS=3]
# Needs root, runsc, gcc (static), python3. Prints one line per restore.
set -euo pipefail
mib=${1:-1024} runs=${2:-3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/thaw-load-split.XXXXXX)
R=(runsc --root "$work/root" --network=none --platform=systrap)
cleanup() {
  for id in $("${R[@]}" list -q 2>/dev/null); do "${R[@]}" delete --force "$id" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
gcc -O2 -static -o "$work/app" "$repo/demo/app/thaw-demo-app.c"
mkdir -p "$work/bundle/rootfs" && cp "$work/app" "$work/bundle/rootfs/app"
(cd "$work/bundle" && runsc spec -- /app --mib "$mib" --init-ms 0 --tick-ms 10)
python3 - "$work/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c['process']['terminal'] = False; c['root']['readonly'] = False
json.dump(c, open(p, 'w'))
PY
ms() { echo $(( ($2 - $1) / 1000000 )); }
"${R[@]}" create --bundle "$work/bundle" src >"$work/src.log" 2>&1
"${R[@]}" start src
until grep -q TICK "$work/src.log"; do sleep 0.1; done
mkdir "$work/img"
"${R[@]}" checkpoint --compression=none --image-path="$work/img" src
"${R[@]}" delete --force src >/dev/null 2>&1 || true
cat "$work/img"/* >/dev/null # in the page cache
echo "image: $(du -sh "$work/img" | cut -f1), runsc $(runsc --version | head -1)"
for i in $(seq "$runs"); do
  id=r$i dbg=$work/dbg$i; mkdir "$dbg"
  t0=$(date +%s%N)
  "${R[@]}" --debug --debug-log="$dbg/" create --bundle "$work/bundle" "$id" >"$work/$id.log" 2>&1
  t1=$(date +%s%N)
  "${R[@]}" --debug --debug-log="$dbg/" restore --detach --bundle "$work/bundle" --image-path="$work/img" "$id" >>"$work/$id.log" 2>&1
  t2=$(date +%s%N)
  load=$(grep -ho 'Memory files load took \[[^]]*\]' "$dbg"/*boot* | head -1 | sed 's/.*\[\(.*\)\]/\1/')
  echo "run $i: create $(ms "$t0" "$t1") ms, restore $(ms "$t1" "$t2") ms, of which the sentry's memory file load $load"
  "${R[@]}" delete --force "$id" >/dev/null 2>&1 || true
done
