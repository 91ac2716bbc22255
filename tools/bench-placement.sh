#!/usr/bin/env bash
# tools/bench-placement.sh — how much of a FUSE round trip is where the scheduler puts the two
# sides: the same metadata loops on kernel overlayfs and on layervol served over /dev/fuse, the
# daemon and the calling process free, pinned together to one CPU, and pinned to two different
# CPUs; and on layervol served over its per-CPU io_uring queues (when the kernel offers them).
#
# Usage:  sudo tools/bench-placement.sh [--files N] [--rounds R]
#
#   --files N    files per loop (default 3000)
#   --rounds R   rounds; each round runs every placement once, in turn (default 2)
#
# Environment:
#   LAYERVOL       layervol binary (default: <this script's dir>/../target/release/layervol)
#   BENCH_WORKDIR  where to make the work dir, "placement.XXXX" (default /var/tmp; not tmpfs)
#
# Loops (bash builtins, one process, fresh mount with an empty upper each time):
#   create   N files of 513 bytes in a new directory (LOOKUP, CREATE, GETATTR of the directory,
#            GETXATTR security.capability before the write, WRITE, RELEASE: five requests the
#            caller waits for)
#   reopen   `: > f` on each of them again (LOOKUP, OPEN with O_TRUNC, GETXATTR, RELEASE)
#
# Placements (taskset), with `-o io_uring=off`: "free" as a user runs it; "together" = daemon
# and caller on CPU 0; "apart" = daemon on CPU 0, caller on CPU 1. Then "io_uring, free":
# `-o io_uring=on`, where the kernel has FUSE over io_uring (its ring threads pin themselves
# to their queue's CPU, so pinning the daemon means nothing there). Prints seconds per loop and
# the ratio to kernel overlayfs measured in the same round.
#
# Why: a FUSE request wakes a daemon thread, its reply wakes the caller, both with plain (not
# "sync") wakeups; on an otherwise idle machine the scheduler then puts the woken side on the
# idle CPU, so every request crosses CPUs twice. On this 2-vCPU VM that crossing, not the
# daemon's work, is most of a metadata request's cost (see README, "Benchmark"). Over io_uring
# the request goes to a thread of the caller's CPU, and only the reply's wakeup may cross.
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAYERVOL=${LAYERVOL:-$SCRIPT_DIR/../target/release/layervol}
FILES=3000 ROUNDS=2

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { printf 'bench-placement: ERROR: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case $1 in
    --files) [[ $# -ge 2 ]] || die "--files needs a number"; FILES=$2; shift ;;
    --rounds) [[ $# -ge 2 ]] || die "--rounds needs a number"; ROUNDS=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ $FILES =~ ^[1-9][0-9]*$ ]] || die "--files wants a positive integer"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive integer"
[[ ${EUID:-$(id -u)} -eq 0 ]] || die "must run as root (mount -t overlay); try: sudo $0"
[[ -x $LAYERVOL ]] || die "no layervol binary at $LAYERVOL (cargo build --release)"
(($(nproc) >= 2)) || die "needs at least 2 CPUs"
command -v taskset > /dev/null || die "taskset missing (util-linux)"

WORK=$(mktemp -d "${BENCH_WORKDIR:-/var/tmp}/placement.XXXX")
MNT=$WORK/mnt
cleanup() { umount "$MNT" 2> /dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

now() { date +%s.%N; }

# run_one IMPL DAEMON_CPU CALLER_CPU [TRANSPORT] -> prints "create_seconds reopen_seconds"
run_one() {
  local impl=$1 dcpu=$2 ccpu=$3 transport=${4:-off}
  umount "$MNT" 2> /dev/null || true
  rm -rf "${WORK:?}"/{lower,upper,work}
  mkdir -p "$WORK"/{lower,upper,work,mnt}
  local opts="lowerdir=$WORK/lower,upperdir=$WORK/upper,workdir=$WORK/work"
  if [[ $impl == kernel ]]; then
    mount -t overlay overlay -o "$opts" "$MNT"
  else
    ${dcpu:+taskset -c "$dcpu"} "$LAYERVOL" -o "$opts,io_uring=$transport" "$MNT"
  fi
  local pin=(${ccpu:+taskset -c "$ccpu"})
  local t0 t1 t2
  t0=$(now)
  "${pin[@]}" bash -c 'mkdir "$1/d" && cd "$1/d" && s=$(printf "%0512d" 0) &&
    for ((i = 0; i < $2; i++)); do printf "%s\n" "$s" > "f$i" || exit 1; done' _ "$MNT" "$FILES"
  t1=$(now)
  "${pin[@]}" bash -c 'cd "$1/d" && for ((i = 0; i < $2; i++)); do : > "f$i" || exit 1; done' \
    _ "$MNT" "$FILES"
  t2=$(now)
  umount "$MNT"
  echo "$(echo "$t1 - $t0" | bc) $(echo "$t2 - $t1" | bc)"
}

printf '%d files per loop, %d round(s), %s\n' "$FILES" "$ROUNDS" "$(uname -r)"
printf '%-6s %-32s %9s %9s %14s %14s\n' round placement create_s reopen_s create/kernel reopen/kernel
for ((r = 1; r <= ROUNDS; r++)); do
  read -r kc kr < <(run_one kernel "" "")
  printf '%-6s %-32s %9.3f %9.3f %14s %14s\n' "$r" "kernel overlayfs" "$kc" "$kr" 1.00 1.00
  for p in "/dev/fuse, free:::off" "/dev/fuse, together:0:0:off" "/dev/fuse, apart:0:1:off" \
    "io_uring, free:::on"; do
    IFS=: read -r name dcpu ccpu transport <<< "$p"
    read -r c o < <(run_one layervol "$dcpu" "$ccpu" "$transport")
    printf '%-6s %-32s %9.3f %9.3f %14.2f %14.2f\n' "$r" "layervol, $name" "$c" "$o" \
      "$(echo "$c / $kc" | bc -l)" "$(echo "$o / $kr" | bc -l)"
  done
done
