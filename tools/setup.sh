#!/usr/bin/env bash
# tools/setup.sh — install every system dependency layervol needs to build, test and benchmark.
#
# Usage:  sudo tools/setup.sh            (Debian 12 "bookworm", x86-64, run as root)
#
# Idempotent: on a machine that already has everything it only checks and prints the summary
# (no apt-get update, no downloads). What it provides:
#   - build:      build-essential, pkg-config, libfuse3-dev (the Rust toolchain itself is assumed
#                 to be present via rustup)
#   - FUSE:       fuse3 (fusermount3, mount.fuse3), /dev/fuse, `user_allow_other` in /etc/fuse.conf
#   - oracle/benchmarks: kernel overlayfs (module), fuse-overlayfs, fio, attr (getfattr/setfattr),
#                 psmisc (fuser/killall), util-linux + mount, procps, GNU time (/usr/bin/time for
#                 peak RSS), kmod (modprobe)
#   - migration:  runc, iptables (CRIU's network lock), busybox-static (container rootfs),
#                 iproute2 (network namespaces, tc netem for WAN emulation)
#   - CRIU 4.1.1 from Debian 13 "trixie" in a private prefix (/opt/layervol-criu) with a `criu`
#                 wrapper in /usr/local/bin. Debian 12's CRIU 3.17 fails `criu check` on kernels
#                 >= 6.x (vDSO); trixie's criu needs libc6 >= 2.38 so it cannot be installed over
#                 bookworm's libc: its packages and libraries are unpacked with `dpkg -x` and run
#                 through trixie's own dynamic loader (see shared/notes/criu.md).
#                 The trixie package lists are fetched into a private, temporary apt state dir
#                 (own sources list, lists and cache dirs), so the system's apt sources are never
#                 touched: there is no trixie suite to remove afterwards, nothing can be left
#                 behind if the script is interrupted, and later `apt-get install`s keep taking
#                 Debian 12 packages.
#
# Environment:
#   LAYERVOL_CRIU_PREFIX   where CRIU is unpacked (default /opt/layervol-criu)
#   LAYERVOL_FORCE_CRIU=1  reinstall CRIU even if `criu --version` already reports 4.x
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

CRIU_PREFIX=${LAYERVOL_CRIU_PREFIX:-/opt/layervol-criu}
CRIU_WRAPPER=/usr/local/bin/criu
# Packages from trixie that are enough to run criu 4.1.1 from the private prefix.
CRIU_DEBS=(criu libcompel1 libc6 libgnutls30t64 libnftables1 libbsd0 libnet1 libnl-3-200
  libprotobuf-c1 libuuid1 libp11-kit0 libidn2-0 libunistring5 libtasn1-6 libnettle8t64
  libhogweed6t64 libgmp10 libmnl0 libnftnl11 libjansson4 libxtables12 libmd0 libffi8 libedit2
  libtinfo6)

PKGS=(
  build-essential pkg-config libfuse3-dev
  fuse3 fuse-overlayfs fio attr psmisc util-linux mount procps time kmod
  runc iptables busybox-static iproute2
  ca-certificates
)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[[ ${EUID:-$(id -u)} -eq 0 ]] || die "must run as root (try: sudo $0)"
command -v dpkg-query >/dev/null && command -v apt-get >/dev/null || die "needs a Debian system (apt-get, dpkg)"
[[ $(dpkg --print-architecture) == amd64 ]] || log "warning: written for amd64, this is $(dpkg --print-architecture)"

start=$(date +%s)

# One setup at a time (a developer and a CI run may start it together).
exec 9>/var/lock/layervol-setup.lock
flock 9

# ---------------------------------------------------------------------------------------------
# 1. Debian 12 packages (fast path: nothing missing -> no apt-get update)
# ---------------------------------------------------------------------------------------------
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in "${PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    2> >(grep -v 'debconf: delaying package configuration' >&2)
  for p in "${missing[@]}"; do is_installed "$p" || die "package $p did not install"; done
else
  log "all ${#PKGS[@]} Debian packages already installed"
fi

# ---------------------------------------------------------------------------------------------
# 2. FUSE device, fuse.conf, overlay module
# ---------------------------------------------------------------------------------------------
if ! grep -qw fuse /proc/filesystems || [[ ! -c /dev/fuse ]]; then
  modprobe fuse 2>/dev/null || log "modprobe fuse failed (built in, or no module access)"
fi
if [[ ! -c /dev/fuse ]]; then
  mknod -m 0666 /dev/fuse c 10 229 || die "cannot create /dev/fuse"
fi
# Debian's udev rule makes /dev/fuse world-accessible; containers often leave it 0600.
# Rootless mounts (fusermount3 is setuid, but opens /dev/fuse as the caller) need 0666.
chmod 0666 /dev/fuse 2>/dev/null || true
grep -qw fuse /proc/filesystems || die "kernel has no FUSE support (/proc/filesystems)"
if ! grep -qw overlay /proc/filesystems; then
  modprobe overlay 2>/dev/null || true
fi
grep -qw overlay /proc/filesystems || log "warning: kernel overlayfs not available (needed as the test oracle)"

# FUSE over io_uring (Linux 6.14+): off by default in the kernel; with it on, a mount with
# `-o io_uring=on` serves its requests over per-CPU rings (a metadata request then stays on
# the caller's CPU); without, over /dev/fuse. Takes effect for mounts made after this.
URING_PARAM=/sys/module/fuse/parameters/enable_uring
if [[ -w $URING_PARAM ]]; then
  [[ $(cat "$URING_PARAM") == Y ]] || echo Y > "$URING_PARAM" || log "cannot enable $URING_PARAM"
  log "FUSE over io_uring: $(cat "$URING_PARAM")"
else
  log "FUSE over io_uring not available on this kernel (no $URING_PARAM): layervol uses /dev/fuse"
fi

touch /etc/fuse.conf
if ! grep -qE '^[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf; then
  if grep -qE '^[[:space:]]*#[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf; then
    sed -i -E 's/^[[:space:]]*#[[:space:]]*user_allow_other[[:space:]]*$/user_allow_other/' /etc/fuse.conf
  else
    printf 'user_allow_other\n' >>/etc/fuse.conf
  fi
  log "enabled user_allow_other in /etc/fuse.conf"
fi

# ---------------------------------------------------------------------------------------------
# 3. CRIU 4.x from trixie into a private prefix
# ---------------------------------------------------------------------------------------------
criu_ok() { command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -qE 'Version: 4\.'; }

debian_mirror() {
  # The URI of the main Debian archive as configured on this machine (deb822 or one-line form).
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    uri=$(awk 'tolower($1)=="uris:" { for (i=2;i<=NF;i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  fi
  if [[ -z $uri ]]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^(https?|mirror|file):.*\/debian\/?$/) { print $i; exit } }' || true)
  fi
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

install_criu() {
  local mirror keyring tmp
  mirror=$(debian_mirror)
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -r $keyring ]] || die "missing $keyring (package debian-archive-keyring)"
  tmp=$(mktemp -d /var/tmp/layervol-criu.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp' '$CRIU_PREFIX.new'" EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts" "$tmp/prefs" "$tmp/debs"
  # apt drops privileges to _apt for downloads: let it write there.
  chmod 0755 "$tmp"
  chown -R _apt "$tmp/lists" "$tmp/cache" "$tmp/debs" 2>/dev/null || true
  printf 'deb [signed-by=%s] %s trixie main\n' "$keyring" "$mirror" >"$tmp/trixie.list"
  local apt_opts=(
    -o Dir::Etc::SourceList="$tmp/trixie.list" -o Dir::Etc::SourceParts="$tmp/parts"
    -o Dir::Etc::Preferences="$tmp/prefs/none" -o Dir::Etc::PreferencesParts="$tmp/prefs"
    -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache"
    -o APT::Get::List-Cleanup=0 -o Acquire::Languages=none
  )
  log "fetching CRIU 4.x and its libraries from trixie ($mirror)"
  apt-get "${apt_opts[@]}" update -qq
  (cd "$tmp/debs" && apt-get "${apt_opts[@]}" -t trixie download -qq "${CRIU_DEBS[@]}" >/dev/null)
  rm -rf "$CRIU_PREFIX.new"
  mkdir -p "$CRIU_PREFIX.new"
  local deb
  for deb in "$tmp"/debs/*.deb; do dpkg -x "$deb" "$CRIU_PREFIX.new"; done
  [[ -x $CRIU_PREFIX.new/usr/sbin/criu ]] || die "criu binary missing after unpacking"
  [[ -e $CRIU_PREFIX.new/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 ]] || die "trixie loader missing after unpacking"
  rm -rf "$CRIU_PREFIX.old"
  [[ -e $CRIU_PREFIX ]] && mv "$CRIU_PREFIX" "$CRIU_PREFIX.old"
  mv "$CRIU_PREFIX.new" "$CRIU_PREFIX"
  rm -rf "$CRIU_PREFIX.old" "$tmp"
  trap - EXIT
  cat >"$CRIU_WRAPPER.tmp" <<EOF
#!/bin/sh
# Installed by layervol tools/setup.sh: CRIU from Debian 13 run with its own libc.
P=$CRIU_PREFIX
exec "\$P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$P/usr/lib/x86_64-linux-gnu" "\$P/usr/sbin/criu" "\$@"
EOF
  chmod 0755 "$CRIU_WRAPPER.tmp"
  mv "$CRIU_WRAPPER.tmp" "$CRIU_WRAPPER"
  hash -r
}

if [[ ${LAYERVOL_FORCE_CRIU:-0} != 1 ]] && criu_ok; then
  log "criu already works: $(criu --version 2>/dev/null | head -n1)"
else
  # Only container migration needs CRIU: a failed download must not stop the rest (the
  # filesystem, its tests and benchmarks). Rerun setup.sh to retry.
  if ! (install_criu) || ! criu_ok; then
    log "WARNING: CRIU 4.x could not be installed; migration will not work until setup.sh succeeds"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 4. Summary
# ---------------------------------------------------------------------------------------------
ver() { "$@" 2>&1 | head -n1 || true; }
criu_check=$(criu check 2>&1 | tail -n1 || true)
printf '\n== layervol setup summary (%ss) ==\n' "$(($(date +%s) - start))"
printf '  %-16s %s\n' \
  fusermount3 "$(ver fusermount3 --version)" \
  fuse-overlayfs "$(fuse-overlayfs --version 2>/dev/null | grep -m1 'fuse-overlayfs' || echo missing)" \
  fio "$(ver fio --version)" \
  getfattr "$(ver getfattr --version)" \
  /usr/bin/time "$([[ -x /usr/bin/time ]] && echo 'GNU time present' || echo missing)" \
  runc "$(ver runc --version)" \
  iptables "$(ver iptables --version)" \
  criu "$(ver criu --version) via $CRIU_WRAPPER; criu check: ${criu_check:-?}" \
  /dev/fuse "$(stat -c '%A' /dev/fuse) $(printf '%d,%d' "0x$(stat -c %t /dev/fuse)" "0x$(stat -c %T /dev/fuse)")" \
  fuse.conf "$(grep -qE '^[[:space:]]*user_allow_other' /etc/fuse.conf && echo user_allow_other)" \
  kernel "$(uname -r); overlay: $(grep -qw overlay /proc/filesystems && echo yes || echo NO)"
