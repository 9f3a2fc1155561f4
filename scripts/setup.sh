#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian bookworm machine (run as root).
# Installs the Debian packages thaw needs, a private CRIU 4.x prefix, npm dependencies,
# then builds TypeScript and the native addon. Safe to run again: each step checks first.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
log() { printf '[setup] %s\n' "$*" >&2; }

# Adds an apt suite (deb822) next to the bookworm entry, deriving the archive URI from it so that
# no host name is written down here.
add_suite() {
  local suite=$1 file=/etc/apt/sources.list.d/thaw-$1.sources src uri
  if grep -qsE "^Suites:(.* )?$suite( |\$)" /etc/apt/sources.list.d/*.sources; then return 1; fi
  src=$(grep -lE '^Suites:(.* )?bookworm( |$)' /etc/apt/sources.list.d/*.sources | head -n1)
  uri=$(awk '$1 == "URIs:" {print $2; exit}' "$src")
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
    "$uri" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg > "$file"
  # trixie and sid are only ever downloaded from (private prefixes of CRIU and containerd), never
  # installed from: pinned below bookworm so that no install ever picks their packages.
  if [ "$suite" = trixie ] || [ "$suite" = sid ]; then
    printf 'Package: *\nPin: release n=%s\nPin-Priority: 50\n' "$suite" > "/etc/apt/preferences.d/thaw-$suite"
  fi
  return 0
}

debs=(runsc containerd runc containernetworking-plugins busybox-static liburing-dev libaio-dev libxxhash-dev
      libbsd0 libgnutls30 libnl-3-200 libuuid1 libjansson4 libcap2 libnet1 iptables)
need_apt=0
command -v runsc >/dev/null && runsc --version 2>/dev/null | grep -q 2024 || need_apt=1
for p in containerd runc busybox-static liburing-dev libaio-dev libxxhash-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  changed=0
  add_suite bookworm-backports && changed=1
  add_suite trixie && changed=1
  log "installing Debian packages"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm \
    runsc/bookworm-backports "${debs[@]:1}" >/dev/null
fi

# CRIU 4.2: bookworm's 3.17 fails on kernels >= 6.11; trixie's 4.1.1 cannot dump a process that holds
# an inet socket (a listening server) on kernels >= 6.16, which refuse getsockopt(SO_PASSCRED) there
# (CRIU issue 2718, fixed in 4.2); sid's 4.2.1 needs glibc 2.38, so its binary runs from a private
# prefix through that prefix's own loader (trixie's libc and libraries, sid's where 4.2 needs newer
# ones; see docs/native-engine.md). A prefix of another version is replaced.
criu_prefix=${THAW_CRIU_PREFIX:-/opt/thaw/criu}
criu_version=4.2.1
if ! "$criu_prefix/bin/criu" --version 2>/dev/null | grep -q "Version: $criu_version"; then
  add_suite trixie || true
  add_suite sid || true
  # The suite files may exist while their package lists were never fetched on this machine.
  apt-cache madison criu 2>/dev/null | grep -q " $criu_version-" || apt-get update -q >/dev/null
  log "unpacking CRIU $criu_version into $criu_prefix"
  dl=$(mktemp -d); chmod 755 "$dl"  # apt's download user must be able to write there
  (cd "$dl" && apt-get download -q "criu=$criu_version-*" libcompel1/sid libnet9/sid libnl-3-200/sid \
      libprotobuf-c1/trixie libnftables1/trixie libmnl0/trixie libnftnl11/trixie libxtables12/trixie \
      libc6/trixie >/dev/null)
  rm -rf "$criu_prefix/root" "$criu_prefix/debs"
  mkdir -p "$criu_prefix/root" "$criu_prefix/bin"
  for d in "$dl"/*.deb; do dpkg-deb -x "$d" "$criu_prefix/root"; done
  mkdir -p "$criu_prefix/debs" && cp "$dl"/*.deb "$criu_prefix/debs/"
  rm -rf "$dl"
  cat > "$criu_prefix/bin/criu" <<WRAP
#!/bin/sh
p=$criu_prefix/root
exec "\$p/usr/lib64/ld-linux-x86-64.so.2" --library-path "\$p/usr/lib/x86_64-linux-gnu" "\$p/usr/sbin/criu" "\$@"
WRAP
  chmod 755 "$criu_prefix/bin/criu"
  "$criu_prefix/bin/criu" check 2>&1 | grep -q 'Looks good' || log "warning: criu check did not pass; the native engine will not work"
fi

# containerd 1.7 (trixie) and 2.x (sid) for the tests that run against every containerd release
# (test/helpers/containerd.ts containerdVersions): unpacked into private prefixes, never installed,
# so the system keeps bookworm's 1.6 (their binaries needed only libc6 >= 2.34 so far). The prefix gets
# usr/bin/{containerd,ctr,containerd-shim-runc-v2}; a half-done unpack never counts as done.
unpack_containerd() {
  local suite=$1 prefix=$2 dl
  [ -x "$prefix/usr/bin/containerd" ] && return 0
  add_suite "$suite" || true
  # `apt-cache show PKG/SUITE` exits 0 even when the suite's lists were never fetched: ask madison.
  apt-cache madison containerd 2>/dev/null | grep -q " $suite/" || apt-get update -q >/dev/null
  log "unpacking containerd from $suite into $prefix"
  dl=$(mktemp -d); chown _apt "$dl" 2>/dev/null || true  # apt downloads as _apt where it can write
  (cd "$dl" && apt-get download -q "containerd/$suite" >/dev/null)
  rm -rf "$prefix.partial"; mkdir -p "$(dirname "$prefix")"
  dpkg -x "$dl"/containerd_*.deb "$prefix.partial"
  rm -rf "$dl" "$prefix"
  mv "$prefix.partial" "$prefix"
  "$prefix/usr/bin/containerd" --version >/dev/null 2>&1 ||
    log "warning: $prefix/usr/bin/containerd does not run here; its containerd-version tests will skip"
}
unpack_containerd trixie "${THAW_CONTAINERD17_PREFIX:-/opt/thaw/containerd-1.7}"
unpack_containerd sid "${THAW_CONTAINERD2_PREFIX:-/opt/thaw/containerd-2}"

if [ ! -d node_modules ] || [ package.json -nt node_modules/.thaw-installed ]; then
  log "installing npm dependencies"
  if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; else npm install --no-audit --no-fund --loglevel=error; fi
  touch node_modules/.thaw-installed
fi

log "building"
npm_config_nodedir=${npm_config_nodedir:-/usr} npm run --silent build
