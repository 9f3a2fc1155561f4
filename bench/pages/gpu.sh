#!/bin/bash
# The overlapped restore on the GPU machine (one device call), from the repository root:
#
#   BUDGET_S=500 bash bench/pages/gpu.sh 'CASES_JSON'
#
# Needs, carried along: .gpu/ as for bench/gpu/run-all.sh (debs/ with criu + its six trixie libraries,
# node.xz, node_modules.tgz, app/dist = this checkout compiled with `npx tsc -p . --outDir .gpu/app/dist`)
# and native/uffd/build (the page server addon, built on the dev machine:
# `npx node-gyp -C native/uffd rebuild --nodedir=/usr`; it needs only libc and libstdc++).
# Results: $OUT/pages-gpu.json and pages-gpu.log.
set -u
CASES=${1:?cases JSON}
BUDGET_S=${BUDGET_S:-500}
OUT=${OUT:-/tmp/thaw-out}
W=/tmp/thaw-pages-gpu
P=$W/prefix
NODE=$W/node/node
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/pages-gpu-run.log") 2>&1
echo "=== $(date +%T) environment"
nvidia-smi --query-gpu=name,uuid,driver_version,memory.used --format=csv,noheader
nproc; free -g | head -2; cat /sys/kernel/mm/transparent_hugepage/enabled; ls -la /dev/userfaultfd 2>&1
cat /proc/sys/vm/unprivileged_userfaultfd

echo "=== $(date +%T) prefix: criu 4.1.1"
rm -rf "$P"; mkdir -p "$P"
for d in .gpu/debs/*.deb; do dpkg -x "$d" "$P"; done
cat > "$P/criu.sh" <<EOS
#!/bin/sh
LD_LIBRARY_PATH=$P/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $P/usr/sbin/criu "\$@"
EOS
chmod +x "$P/criu.sh"
"$P/criu.sh" --version | head -1
"$P/criu.sh" check --feature uffd-noncoop

echo "=== $(date +%T) node + compiled thaw + page server addon"
python3 - <<EOS
import lzma, shutil, os
os.makedirs("$W/node", exist_ok=True)
with lzma.open(".gpu/node.xz") as src, open("$NODE", "wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
os.chmod("$NODE", 0o755)
EOS
rm -rf "$W/app"; mkdir -p "$W/app/native/uffd/build/Release"
tar -xzf .gpu/node_modules.tgz -C "$W/app"
cp -r .gpu/app/dist "$W/app/dist"
cp native/uffd/binding.gyp "$W/app/native/uffd/"
cp native/uffd/build/Release/thaw_uffd.node "$W/app/native/uffd/build/Release/"
echo '{"type":"module"}' > "$W/app/package.json"
"$NODE" -e "console.log(Object.keys(require('$W/app/native/uffd/build/Release/thaw_uffd.node')).join(' '))"

echo "=== $(date +%T) thaw-cuda"
make -s -C native/cuda && native/cuda/thaw-cuda --probe; echo "probe rc=$?"

if echo "$CASES" | grep -q weights-16g; then
  echo "=== $(date +%T) weights: 16.4 GB"
  mkdir -p "$W/data"; python3 bench/gpu/make-weights.py 16400000000 "$W/data/weights-16g.bin" 12
fi

echo "=== $(date +%T) flows"
"$NODE" "$W/app/dist/bench/pages/gpu.js" --out "$OUT" --work "$W/flows" --criu "$P/criu.sh" \
  --thaw-cuda "$(pwd)/native/cuda/thaw-cuda" --python "$(command -v python3)" --workload "$(pwd)/bench/gpu/workload.py" \
  --budget-s "$BUDGET_S" --cases "$CASES"
echo "flow rc=$?"
