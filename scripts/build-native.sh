#!/usr/bin/env bash
# Builds the native parts: the I/O, reaper, console and page-server addons (node-gyp, against the headers in
# /usr/include/node since node-gyp cannot download them here) and thaw-cuda (plain gcc; libcuda is
# dlopened at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f native/binding.gyp ]; then
  npx node-gyp -C native rebuild --nodedir="${npm_config_nodedir:-/usr}" --loglevel=error >/dev/null \
    || { echo "[build] native I/O addon failed to build; thaw falls back to its TypeScript I/O" >&2
         # The reaper (exact exit statuses) needs no library: build it on its own.
         make -s -C native/build BUILDTYPE=Release thaw_reaper >/dev/null 2>&1 \
           || echo "[build] reaper addon failed to build; the shim learns exits from runsc wait" >&2; }
fi
# The console-socket addon (terminal tasks: receives the pty master from runsc/runc). Without it
# thaw refuses terminal tasks with a clear error; everything else works.
if [ -f native/console/binding.gyp ]; then
  npx node-gyp -C native/console rebuild --nodedir="${npm_config_nodedir:-/usr}" --loglevel=error >/dev/null \
    || { echo "[build] console addon failed to build; terminal (-t) tasks are refused" >&2; }
fi
# The userfaultfd page server (native engine: lazy-pages restore overlapped with the CUDA restore).
# Without it the native engine restores through CRIU alone (restore.lazyPages "auto" says why once).
if [ -f native/uffd/binding.gyp ]; then
  npx node-gyp -C native/uffd rebuild --nodedir="${npm_config_nodedir:-/usr}" --loglevel=error >/dev/null \
    || { echo "[build] page-server addon failed to build; the native engine restores without lazy pages" >&2; }
fi
if [ -f native/cuda/Makefile ]; then make -s -C native/cuda; fi
