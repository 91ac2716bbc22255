#!/usr/bin/env bash
# tools/bench-fs.sh — compare layervol with kernel overlayfs and fuse-overlayfs, in one run.
#
# Usage:  sudo tools/bench-fs.sh [--quick]
#                                 [--only kernel,fuse-overlayfs,layervol,layervol-volume,layervol-uring]
#                                 [--reps N]
#                                 [--out FILE] [--keep]
#
#   --quick        smoke-run sizes: 64 MiB files, 1000 small files, ~20 MiB tree; 1 repetition
#   --reps N       repetitions (default 3, quick 1); each cell is the median of N runs, each run
#                  on a fresh mount with an empty upper; implementations are interleaved per
#                  workload (all mounted side by side, in a rotating order)
#   --only LIST    comma-separated subset of: kernel, fuse-overlayfs (alias fuse), layervol,
#                  layervol-volume (alias volume: a volume whose base layer is imported from the
#                  lower layer, `layervol volume create --from`, not timed, and `layervol mount`),
#                  layervol-uring (alias uring: layervol with -o io_uring=on, beside the others)
#                  (default: the first four; layervol is skipped with a warning if its binary
#                  is missing)
#   --out FILE     also write the markdown result table to FILE
#   --keep         keep the work dir (layers, logs) instead of deleting it
#
# Environment:
#   LAYERVOL          layervol binary (default: <this script's dir>/../target/release/layervol).
#                     It is run as `$LAYERVOL -o lowerdir=L,upperdir=U,workdir=W MNT`, must daemonise
#                     and return once the mount is ready; `umount MNT` ends it.
#   LAYERVOL_OPTIONS  more mount options for the layervol mounts, overlay and volume (e.g.
#                     io_uring=on); shown in the table's header line.
#   BENCH_WORKDIR     work dir root (default /var/tmp/layervol-bench; must not be tmpfs)
#   BENCH_TREE_CACHE  cache of the "real tree" (default /var/tmp/layervol-bench-tree)
#   BENCH_TIMEOUT     per-workload timeout in seconds (default 900)
#   BENCH_MOUNT_TIMEOUT  seconds the mount command may take to return (default 30)
#
# What one run does: it builds one lower layer (a file of random data, BIG = 512 MiB, and a real
# directory tree of ~100 MiB copied once from /usr/share/{doc,locale,man} and /usr/include and cached
# in BENCH_TREE_CACHE), then, N times: mounts it once per implementation, side by side, each with
# a fresh, empty upper and work dir; runs each workload below, in this order, on every
# implementation in turn (the order of the implementations rotates from one workload to the
# next, so the times of one row are taken within minutes of each other: this machine's speed
# drifts more than that over a whole run); reads each daemon's peak RSS (VmHWM) and CPU time
# from /proc; unmounts; and checks that the lower layer was not modified. Before every
# workload: `sync; echo 3 > /proc/sys/vm/drop_caches` (cold page, dentry and inode caches, also
# those of the FUSE mount). Each workload is timed by wall clock (date +%s.%N); the table shows
# the median over the repetitions. A full run of the three implementations takes a few minutes.
#
#   seq-read      dd bs=1M of the lower BIG file to /dev/null
#   rand-read     fio randread, bs=4k, psync, buffered, over the lower BIG file (opened read-only:
#                 no copy-up), a fixed amount of I/O: 64 MiB = 16384 reads (quick: 16 MiB)
#   seq-write     dd bs=1M of a new BIG-sized file from /dev/zero, conv=fsync
#   rand-write    fio randwrite, bs=4k, psync, buffered, into the lower BIG file, 64 MiB = 16384
#                 writes (quick: 16 MiB) spread over the whole file, end_fsync=1; the wall time
#                 includes the copy-up that the open for writing triggers
#   create-files  5000 files of 513 bytes in one new directory (bash builtin printf, no fsync)
#   read-tree     find TREE -type f | xargs cat > /dev/null
#   ls-lR         ls -lR TREE > /dev/null
#   cp-tree       cp -a TREE TREE-copy (within the mount)
#   rm-lower-tree rm -rf TREE (the lower copy: whiteouts / opaque dirs in the upper)
#   rm-files      rm -rf of the 5000 created files
#
# Output: one line per measurement while running, then a markdown table with the seconds of each
# implementation, the ratios layervol/kernel, layervol/fuse-overlayfs and fuse-overlayfs/kernel,
# their geometric means, and the FUSE daemons' peak RSS (max over runs) and CPU time (median).
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAYERVOL=${LAYERVOL:-$SCRIPT_DIR/../target/release/layervol}
LAYERVOL_OPTIONS=${LAYERVOL_OPTIONS:-}
WORKROOT=${BENCH_WORKDIR:-/var/tmp/layervol-bench}
TREE_CACHE=${BENCH_TREE_CACHE:-/var/tmp/layervol-bench-tree}
TIMEOUT=${BENCH_TIMEOUT:-900}
MOUNT_TIMEOUT=${BENCH_MOUNT_TIMEOUT:-30}

QUICK=0 KEEP=0 OUT="" ONLY="" ONLY_EXPLICIT=0 REPS=""
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { printf 'bench-fs: ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[bench] %s\n' "$*" >&2; }
warn() { printf '[bench] WARNING: %s\n' "$*" >&2; WARNINGS+=("$*"); }
WARNINGS=()

while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --keep) KEEP=1 ;;
    --only) [[ $# -ge 2 ]] || die "--only needs a list"; ONLY=$2; ONLY_EXPLICIT=1; shift ;;
    --only=*) ONLY=${1#--only=}; ONLY_EXPLICIT=1 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a file"; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --reps) [[ $# -ge 2 ]] || die "--reps needs a number"; REPS=$2; shift ;;
    --reps=*) REPS=${1#--reps=} ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -z $REPS || $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps wants a positive integer"
if [[ -z $REPS ]]; then ((QUICK)) && REPS=1 || REPS=3; fi
[[ ${EUID:-$(id -u)} -eq 0 ]] || die "must run as root (mount -t overlay, drop_caches); try: sudo $0"

# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
if ((QUICK)); then
  BIG_MIB=64 RW_IO_MIB=16 RR_IO_MIB=16 NFILES=1000 TREE_MIB=20
else
  BIG_MIB=512 RW_IO_MIB=64 RR_IO_MIB=64 NFILES=5000 TREE_MIB=100
fi
export BIG_MIB RW_IO_MIB RR_IO_MIB NFILES

# ------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------
ALL_IMPLS=(kernel fuse-overlayfs layervol layervol-volume layervol-uring)
declare -A WANT=()
if ((ONLY_EXPLICIT)); then
  IFS=, read -r -a _only <<<"$ONLY"
  for i in "${_only[@]}"; do
    case $i in
      kernel | overlay | overlayfs) WANT[kernel]=1 ;;
      fuse-overlayfs | fuse) WANT[fuse-overlayfs]=1 ;;
      layervol) WANT[layervol]=1 ;;
      layervol-volume | volume) WANT[layervol-volume]=1 ;;
      layervol-uring | uring) WANT[layervol-uring]=1 ;;
      "") ;;
      *) die "unknown implementation '$i' in --only (kernel, fuse-overlayfs, layervol, layervol-volume, layervol-uring)" ;;
    esac
  done
else
  # layervol-uring only when asked for: the default table compares the default transport.
  for i in "${ALL_IMPLS[@]}"; do [[ $i == layervol-uring ]] || WANT[$i]=1; done
fi
for t in fio dd find xargs cat ls cp rm mount umount mountpoint findmnt timeout pgrep; do
  command -v "$t" >/dev/null || die "missing tool '$t' (run tools/setup.sh)"
done
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
if [[ -n ${WANT[kernel]:-} ]] && ! grep -qw overlay /proc/filesystems; then
  die "kernel overlayfs not available"
fi
if [[ -n ${WANT[fuse-overlayfs]:-} ]] && ! command -v fuse-overlayfs >/dev/null; then
  die "fuse-overlayfs not installed (run tools/setup.sh)"
fi
if [[ -n ${WANT[layervol]:-}${WANT[layervol-volume]:-}${WANT[layervol-uring]:-} ]] && [[ ! -x $LAYERVOL ]]; then
  if ((ONLY_EXPLICIT)); then
    die "layervol binary not found at $LAYERVOL (cargo build --release, or set LAYERVOL=)"
  fi
  warn "layervol binary not found at $LAYERVOL: skipped (cargo build --release, or set LAYERVOL=)"
  unset 'WANT[layervol]' 'WANT[layervol-volume]' 'WANT[layervol-uring]'
fi
IMPLS=()
for i in "${ALL_IMPLS[@]}"; do [[ -n ${WANT[$i]:-} ]] && IMPLS+=("$i"); done
((${#IMPLS[@]})) || die "no implementation to run"
[[ -w /proc/sys/vm/drop_caches ]] || die "/proc/sys/vm/drop_caches is not writable: cold-cache runs impossible"

# ------------------------------------------------------------------------------------------------
# Work dir
# ------------------------------------------------------------------------------------------------
mkdir -p "$WORKROOT" "$TREE_CACHE"
fstype=$(findmnt -no FSTYPE -T "$WORKROOT" | head -n1)
case $fstype in
  tmpfs | ramfs) die "$WORKROOT is on $fstype: cold-cache numbers would be meaningless (set BENCH_WORKDIR)" ;;
esac
need_mib=$((BIG_MIB * 4 + TREE_MIB * 4 + 256))
avail_mib=$(($(df --output=avail -k "$WORKROOT" | tail -n1) / 1024))
((avail_mib > need_mib)) || die "not enough space in $WORKROOT: ${avail_mib} MiB free, need ~${need_mib} MiB"
RUN=$(mktemp -d "$WORKROOT/run.XXXXXX")
LOGDIR=$RUN/logs
mkdir -p "$LOGDIR"
export LOGDIR

declare -A DAEMON_PID=()
mounts_under_run() { findmnt -rn -o TARGET | awk -v p="$RUN/" 'index($0, p) == 1' | sort -r; }
fuse_conn_abort() { # $1 = mountpoint
  local mm
  mm=$(mountpoint -d "$1" 2>/dev/null) || return 0
  [[ ${mm%%:*} == 0 && -w /sys/fs/fuse/connections/${mm##*:}/abort ]] &&
    echo 1 >"/sys/fs/fuse/connections/${mm##*:}/abort" 2>/dev/null || true
}
cleanup() {
  local rc=$? m pid
  trap - EXIT INT TERM
  while read -r m; do
    [[ -n $m ]] || continue
    umount "$m" 2>/dev/null || { fuse_conn_abort "$m"; umount -l "$m" 2>/dev/null || true; }
  done < <(mounts_under_run)
  for pid in "${DAEMON_PID[@]}"; do
    [[ -n $pid ]] && alive "$pid" && kill "$pid" 2>/dev/null || true
  done
  if ((KEEP)); then
    log "work dir kept: $RUN"
  elif [[ -n $(mounts_under_run) ]]; then
    log "mounts remain under $RUN; not deleting it"
  else
    rm -rf --one-file-system "$RUN"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# ------------------------------------------------------------------------------------------------
# The real tree (cached across runs)
# ------------------------------------------------------------------------------------------------
build_tree() { # $1 = target MiB -> prints the cached tree dir
  local target=$(($1 * 1024 * 1024)) dest="$TREE_CACHE/tree-${1}M" total=0 src limit pct e sz
  if [[ -f $dest.complete && -d $dest ]]; then printf '%s\n' "$dest"; return; fi
  log "building the ~${1} MiB tree in $dest (once; cached for later runs)"
  rm -rf "$dest" "$dest.tmp" "$dest.complete"
  mkdir -p "$dest.tmp"
  # source:cumulative share of the target, in percent
  for spec in /usr/share/doc:50 /usr/share/locale:75 /usr/share/man:85 /usr/include:100 \
    /usr/lib/python3:100 /usr/share/perl:100 /usr/lib/x86_64-linux-gnu:100; do
    src=${spec%:*} pct=${spec##*:}
    [[ -d $src ]] || continue
    limit=$((target * pct / 100))
    ((total < limit)) || continue
    mkdir -p "$dest.tmp/$(basename "$src")"
    for e in "$src"/*; do
      ((total < limit)) || break
      [[ -e $e || -L $e ]] || continue
      sz=$(du -sb "$e" 2>/dev/null | cut -f1) || continue
      ((sz <= target / 4)) || continue # no single blob dominates the tree
      cp -a "$e" "$dest.tmp/$(basename "$src")/" 2>/dev/null || continue
      total=$((total + sz))
    done
  done
  ((total > target / 2)) || die "could only gather $((total / 1048576)) MiB for the tree"
  mv "$dest.tmp" "$dest"
  printf 'bytes=%s files=%s dirs=%s\n' "$total" "$(find "$dest" -type f | wc -l)" \
    "$(find "$dest" -type d | wc -l)" >"$dest.complete"
  printf '%s\n' "$dest"
}

TREE_SRC=$(build_tree "$TREE_MIB")
TREE_INFO=$(cat "$TREE_SRC.complete")

# ------------------------------------------------------------------------------------------------
# The lower layer (shared read-only by all implementations; verified unchanged after each)
# ------------------------------------------------------------------------------------------------
LOWER=$RUN/lower
build_lower() {
  rm -rf "$LOWER"
  mkdir -p "$LOWER"
  head -c "$((BIG_MIB * 1024 * 1024))" /dev/urandom >"$LOWER/big.dat"
  cp -a "$TREE_SRC" "$LOWER/tree"
  sync
}
lower_fingerprint() {
  find "$LOWER" -printf '%P %y %s %m %T@ %i\n' | sort | md5sum | cut -d' ' -f1
}
log "building the lower layer in $LOWER (big.dat ${BIG_MIB} MiB + tree: $TREE_INFO)"
build_lower
LOWER_FP=$(lower_fingerprint)
TREE_FILES=$(find "$LOWER/tree" -type f | wc -l)
TREE_ENTRIES=$(find "$LOWER/tree" | wc -l)

# ------------------------------------------------------------------------------------------------
# Workloads (bash -c strings; MNT, sizes and LOGDIR come from the environment)
# ------------------------------------------------------------------------------------------------
WORKLOADS=(seq-read rand-read seq-write rand-write create-files read-tree ls-lR cp-tree rm-lower-tree rm-files)
declare -A WDESC=(
  [seq-read]="sequential read, ${BIG_MIB} MiB lower file, cold"
  [rand-read]="random 4 KiB reads (${RR_IO_MIB} MiB) of the lower file, cold"
  [seq-write]="sequential write ${BIG_MIB} MiB new file + fsync"
  [rand-write]="random 4 KiB writes (${RW_IO_MIB} MiB) into the lower file, copy-up + fsync"
  [create-files]="create ${NFILES} small files"
  [read-tree]="read every file of the ${TREE_MIB} MiB tree, cold"
  [ls-lR]="ls -lR of the tree, cold"
  [cp-tree]="cp -a of the tree within the mount"
  [rm-lower-tree]="rm -rf of the lower tree"
  [rm-files]="delete the ${NFILES} files"
)
FIO_COMMON='--bs=4k --size=${BIG_MIB}M --ioengine=psync --randrepeat=1 --fallocate=none --invalidate=1 --thread'
declare -A WCMD=(
  [seq-read]='dd if="$MNT/big.dat" of=/dev/null bs=1M status=none'
  [rand-read]='fio --name=randread --filename="$MNT/big.dat" --readonly --rw=randread '"$FIO_COMMON"' --io_size=${RR_IO_MIB}M --output="$LOGDIR/$IMPL-fio-randread.txt"'
  [seq-write]='dd if=/dev/zero of="$MNT/new.dat" bs=1M count=$BIG_MIB conv=fsync status=none'
  [rand-write]='fio --name=randwrite --filename="$MNT/big.dat" --rw=randwrite '"$FIO_COMMON"' --io_size=${RW_IO_MIB}M --end_fsync=1 --output="$LOGDIR/$IMPL-fio-randwrite.txt"'
  [create-files]='mkdir "$MNT/files" && cd "$MNT/files" && s=$(printf "%0512d" 0) && for ((i = 0; i < NFILES; i++)); do printf "%s\n" "$s" >"f$i" || exit 1; done'
  [read-tree]='find "$MNT/tree" -type f -print0 | xargs -0 -r cat >/dev/null'
  [ls-lR]='ls -lR "$MNT/tree" >/dev/null'
  [cp-tree]='cp -a "$MNT/tree" "$MNT/tree-copy"'
  [rm-lower-tree]='rm -rf "$MNT/tree"'
  [rm-files]='rm -rf "$MNT/files"'
)
# Cheap correctness checks after a workload (not timed): an empty output means OK.
check_after() { # $1 = workload
  local n
  case $1 in
    seq-write) n=$(stat -c %s "$MNT/new.dat" 2>/dev/null || echo missing)
      [[ $n == $((BIG_MIB * 1048576)) ]] || echo "new.dat size $n" ;;
    rand-write) n=$(stat -c %s "$MNT/big.dat" 2>/dev/null || echo missing)
      [[ $n == $((BIG_MIB * 1048576)) ]] || echo "big.dat size $n" ;;
    create-files) n=$(find "$MNT/files" -type f | wc -l)
      [[ $n == "$NFILES" ]] || echo "$n of $NFILES files" ;;
    cp-tree) n=$(find "$MNT/tree-copy" | wc -l)
      [[ $n == "$TREE_ENTRIES" ]] || echo "tree-copy has $n of $TREE_ENTRIES entries" ;;
    rm-lower-tree) [[ ! -e $MNT/tree ]] || echo "tree still visible" ;;
    rm-files) [[ ! -e $MNT/files ]] || echo "files still visible" ;;
  esac
}

# ------------------------------------------------------------------------------------------------
# Mount / daemon helpers
# ------------------------------------------------------------------------------------------------
daemon_exe() { case $1 in fuse-overlayfs) echo fuse-overlayfs ;; layervol*) basename "$LAYERVOL" ;; esac; }
exe_base() { local x; x=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1; x=${x% (deleted)}; basename "$x"; }
find_daemon_pid() { # $1 impl, $2 mountpoint
  local name pid
  name=$(daemon_exe "$1")
  for pid in $(pgrep -f -- "$2" || true); do
    [[ $(exe_base "$pid" || true) == "$name" ]] && { echo "$pid"; return; }
  done
  # fall back: the newest process of that executable holding /dev/fuse
  local fd
  for pid in $(pgrep -n -x "${name:0:15}" || true); do
    for fd in /proc/"$pid"/fd/*; do
      [[ $(readlink "$fd" 2>/dev/null) == /dev/fuse ]] && { echo "$pid"; return; }
    done
  done
  return 0
}
alive() { # a zombie (exited, not yet reaped by its parent) counts as gone
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [[ ${st:0:1} != Z ]]
}
proc_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
proc_cpu_s() { # utime + stime in seconds
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  rest=${stat##*) }
  awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($12 + $13) / t }' <<<"$rest"
}

do_mount() { # $1 impl
  local opts="lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK"
  case $1 in
    kernel) timeout -k 5 "$MOUNT_TIMEOUT" mount -t overlay overlay -o "$opts" "$MNT" ;;
    fuse-overlayfs) timeout -k 5 "$MOUNT_TIMEOUT" fuse-overlayfs -o "$opts" "$MNT" ;;
    layervol) timeout -k 5 "$MOUNT_TIMEOUT" "$LAYERVOL" -o "$opts${LAYERVOL_OPTIONS:+,$LAYERVOL_OPTIONS}" "$MNT" ;;
    layervol-uring) timeout -k 5 "$MOUNT_TIMEOUT" "$LAYERVOL" -o "$opts${LAYERVOL_OPTIONS:+,$LAYERVOL_OPTIONS},io_uring=on" "$MNT" ;;
    layervol-volume)
      "$LAYERVOL" volume create "$UPPER/vol" --from "$LOWER" &&
        timeout -k 5 "$MOUNT_TIMEOUT" "$LAYERVOL" mount ${LAYERVOL_OPTIONS:+-o "$LAYERVOL_OPTIONS"} "$UPPER/vol" "$MNT" ;;
  esac
}
wait_mounted() {
  local i
  for ((i = 0; i < 100; i++)); do mountpoint -q "$MNT" && return 0; sleep 0.1; done
  return 1
}
do_umount() { # $1 impl; waits for the daemon to exit
  local i pid=${DAEMON_PID[$1]:-}
  for ((i = 0; i < 5; i++)); do
    umount "$MNT" 2>>"$LOGDIR/$1-umount.txt" && break
    sleep 1
  done
  if mountpoint -q "$MNT" 2>/dev/null; then
    warn "$1: umount failed; aborting the connection and detaching"
    fuse_conn_abort "$MNT"
    umount -l "$MNT" 2>/dev/null || true
  fi
  if [[ -n $pid ]]; then
    for ((i = 0; i < 300; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      warn "$1: daemon $pid still alive 30 s after umount; killing it"
      kill "$pid" 2>/dev/null || true
    fi
  fi
}

# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------
declare -A T=() HWM=() CPU=() NOTE=() UP=()
impl_env() { # $1 impl, $2 repetition number: its mount, upper and work dir
  export IMPL=$1
  local d=$RUN/$1.$2
  export MNT=$d/mnt UPPER=$d/upper WORK=$d/work
}
mount_impl() { # $1 impl, $2 repetition number; sets UP[impl] when mounted
  local impl=$1 r=$2 w rc pid
  impl_env "$impl" "$r"
  mkdir -p "$MNT" "$UPPER" "$WORK"
  log "== $impl (run $r/$REPS) =="
  rc=0
  do_mount "$impl" >"$LOGDIR/$impl-mount.txt" 2>&1 || rc=$?
  if ((rc)) || ! wait_mounted; then
    local why="exit $rc"
    ((rc == 124)) && why="the mount command did not return within ${MOUNT_TIMEOUT} s"
    ((rc)) || why="exit 0 but not mounted after 10 s"
    warn "$impl: mount failed ($why): $(tr '\n' ' ' <"$LOGDIR/$impl-mount.txt" | cut -c1-300)"
    for w in "${WORKLOADS[@]}"; do T[$impl:$w:$r]=FAIL; done
    if mountpoint -q "$MNT" 2>/dev/null; then
      DAEMON_PID[$impl]=$(find_daemon_pid "$impl" "$MNT")
      do_umount "$impl"
      DAEMON_PID[$impl]=""
    fi
    ((KEEP)) || rm -rf --one-file-system "$RUN/$impl.$r"
    return 0
  fi
  log "mounted ($(findmnt -no FSTYPE "$MNT"))"
  if [[ $impl != kernel ]]; then
    pid=$(find_daemon_pid "$impl" "$MNT")
    DAEMON_PID[$impl]=$pid
    [[ -n $pid ]] || warn "$impl: daemon pid not found; no peak RSS"
  fi
  UP[$impl]=1
}
run_workload() { # $1 impl, $2 repetition number, $3 workload
  local impl=$1 r=$2 w=$3 t0 t1 rc chk
  impl_env "$impl" "$r"
  drop_caches
  t0=$(now)
  rc=0
  timeout -k 10 "$TIMEOUT" bash -c "set -o pipefail; ${WCMD[$w]}" \
    >>"$LOGDIR/$impl-$w.txt" 2>&1 || rc=$?
  t1=$(now)
  if ((rc)); then
    T[$impl:$w:$r]=FAIL
    warn "$impl $w failed (exit $rc$( ((rc == 124)) && echo ", timeout ${TIMEOUT}s")): $(tail -n 3 "$LOGDIR/$impl-$w.txt" | tr '\n' ' ' | cut -c1-300)"
    if ! mountpoint -q "$MNT" || ! timeout 5 stat "$MNT" >/dev/null 2>&1; then
      warn "$impl: mount is gone or hung; remaining workloads skipped"
      UP[$impl]=""
    fi
    return 0
  fi
  T[$impl:$w:$r]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  chk=$(check_after "$w" 2>&1 || true)
  if [[ -n $chk ]]; then
    NOTE[$impl:$w]=$chk
    warn "$impl $w: result check failed: $chk"
  fi
  printf '[bench] %-15s %-14s %9s s\n' "$impl" "$w" "${T[$impl:$w:$r]}" >&2
}
unmount_impl() { # $1 impl, $2 repetition number
  local impl=$1 r=$2 w pid
  impl_env "$impl" "$r"
  for w in "${WORKLOADS[@]}"; do [[ -n ${T[$impl:$w:$r]:-} ]] || T[$impl:$w:$r]=FAIL; done
  if mountpoint -q "$MNT" 2>/dev/null; then
    pid=${DAEMON_PID[$impl]:-}
    if [[ -n $pid ]]; then
      HWM[$impl:$r]=$(proc_hwm_kib "$pid")
      CPU[$impl:$r]=$(proc_cpu_s "$pid")
      log "$impl daemon pid $pid: peak RSS ${HWM[$impl:$r]:-?} KiB, CPU ${CPU[$impl:$r]:-?} s"
    fi
    do_umount "$impl"
  fi
  DAEMON_PID[$impl]=""
  UP[$impl]=""
  ((KEEP)) || rm -rf --one-file-system "$RUN/$impl.$r"
}
# One repetition: every implementation mounted side by side (each on its own fresh upper),
# then each workload on each implementation in turn, so the times compared in a row are
# taken minutes apart at most (this machine's speed drifts over minutes). The order of the
# implementations rotates from one workload to the next.
run_rep() { # $1 repetition number
  local r=$1 impl w i k n=${#IMPLS[@]}
  for impl in "${IMPLS[@]}"; do mount_impl "$impl" "$r"; done
  k=$((r - 1))
  for w in "${WORKLOADS[@]}"; do
    for ((i = 0; i < n; i++)); do
      impl=${IMPLS[$(((i + k) % n))]}
      [[ -n ${UP[$impl]:-} ]] && run_workload "$impl" "$r" "$w"
    done
    k=$((k + 1))
  done
  for impl in "${IMPLS[@]}"; do unmount_impl "$impl" "$r"; done
  if [[ $(lower_fingerprint) != "$LOWER_FP" ]]; then
    warn "run $r modified the lower layer! rebuilding it for the next run"
    build_lower
    LOWER_FP=$(lower_fingerprint)
  fi
}

load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" -v n="$(nproc)" 'BEGIN { exit !(l >= n / 2) }'; then
  warn "load average is $load1 at start: other work on this machine skews the numbers"
fi
START=$(now)
for ((rep = 1; rep <= REPS; rep++)); do run_rep "$rep"; done
# Aggregate: median time per cell (FAIL if any run failed), max peak RSS, median CPU time.
median() { sort -g | awk '{ v[NR] = $1 } END { if (!NR) exit; if (NR % 2) printf "%s", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for impl in "${IMPLS[@]}"; do
  for w in "${WORKLOADS[@]}"; do
    vals=() fail=0
    for ((rep = 1; rep <= REPS; rep++)); do
      v=${T[$impl:$w:$rep]:-FAIL}
      [[ $v == FAIL ]] && fail=1 || vals+=("$v")
    done
    if ((fail)); then T[$impl:$w]=FAIL; else T[$impl:$w]=$(printf '%s\n' "${vals[@]}" | median); fi
  done
  h=$(for ((rep = 1; rep <= REPS; rep++)); do echo "${HWM[$impl:$rep]:-}"; done | sort -g | tail -n1)
  [[ -n $h ]] && HWM[$impl]=$h
  c=$(for ((rep = 1; rep <= REPS; rep++)); do [[ -n ${CPU[$impl:$rep]:-} ]] && echo "${CPU[$impl:$rep]}"; done | median || true)
  [[ -n $c ]] && CPU[$impl]=$c
done
ELAPSED=$(awk -v a="$START" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }')

# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
has() { [[ -n ${WANT[$1]:-} ]]; }
isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { # a / b, or "–"
  if isnum "$1" && isnum "$2" && awk -v b="$2" 'BEGIN { exit !(b > 0) }'; then
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
  else printf '–'; fi
}
geomean() { # ratios on stdin -> geometric mean
  awk '$1 ~ /^[0-9.]+$/ && $1 > 0 { s += log($1); n++ } END { if (n) printf "%.2f (n=%d)", exp(s / n), n; else printf "–" }'
}
PAIRS=()
has layervol && has kernel && PAIRS+=("layervol:kernel")
has layervol && has fuse-overlayfs && PAIRS+=("layervol:fuse-overlayfs")
has fuse-overlayfs && has kernel && PAIRS+=("fuse-overlayfs:kernel")
has layervol-volume && has layervol && PAIRS+=("layervol-volume:layervol")
has layervol-uring && has kernel && PAIRS+=("layervol-uring:kernel")
has layervol-uring && has layervol && PAIRS+=("layervol-uring:layervol")

layervol_rev=""
if has layervol; then
  layervol_rev=$(git -C "$(dirname "$LAYERVOL")" rev-parse --short HEAD 2>/dev/null || true)
fi
table() {
  local w i p a b hdr sep row
  printf '### layervol benchmark (%s)\n\n' "$( ((QUICK)) && echo quick || echo full)"
  printf 'Kernel %s, %s CPUs, %s GiB RAM, work dir on %s; %s; lower: %s MiB file + tree of %s files (%s MiB); %s; cold caches; seconds (lower is better).%s%s\n\n' \
    "$(uname -r)" "$(nproc)" "$(awk '/MemTotal/ { printf "%d", $2 / 1048576 }' /proc/meminfo)" \
    "$fstype" "$(date -u +%Y-%m-%d)" "$BIG_MIB" "$TREE_FILES" \
    "$(awk -F'[= ]' '{ printf "%d", $2 / 1048576 }' <<<"$TREE_INFO")" \
    "$( ((REPS > 1)) && echo "median of $REPS runs per cell" || echo "one run per cell")" \
    "${layervol_rev:+ layervol at $layervol_rev.}" \
    "${LAYERVOL_OPTIONS:+ layervol mounted with -o $LAYERVOL_OPTIONS.}"
  hdr="| workload |" sep="|---|"
  for i in "${IMPLS[@]}"; do hdr+=" $i (s) |"; sep+="---:|"; done
  for p in "${PAIRS[@]}"; do hdr+=" ${p%%:*}/${p##*:} |"; sep+="---:|"; done
  printf '%s\n%s\n' "$hdr" "$sep"
  for w in "${WORKLOADS[@]}"; do
    row="| ${WDESC[$w]} |"
    for i in "${IMPLS[@]}"; do row+=" ${T[$i:$w]:-–}${NOTE[$i:$w]:+ (!)} |"; done
    for p in "${PAIRS[@]}"; do row+=" $(ratio "${T[${p%%:*}:$w]:-}" "${T[${p##*:}:$w]:-}") |"; done
    printf '%s\n' "$row"
  done
  if ((${#PAIRS[@]})); then
    row="| **geometric mean of ratios** |"
    for i in "${IMPLS[@]}"; do row+=" |"; done
    for p in "${PAIRS[@]}"; do
      a=${p%%:*} b=${p##*:}
      row+=" **$(for w in "${WORKLOADS[@]}"; do ratio "${T[$a:$w]:-}" "${T[$b:$w]:-}"; echo; done | geomean)** |"
    done
    printf '%s\n' "$row"
  fi
  row="| daemon peak RSS (VmHWM) |"
  for i in "${IMPLS[@]}"; do
    if [[ $i == kernel ]]; then row+=" (in kernel) |"
    elif [[ -n ${HWM[$i]:-} ]]; then row+=" $(awk -v k="${HWM[$i]}" 'BEGIN { printf "%.1f MiB", k / 1024 }') |"
    else row+=" ? |"; fi
  done
  for p in "${PAIRS[@]}"; do row+=" |"; done
  printf '%s\n' "$row"
  row="| daemon CPU time (user+sys) |"
  for i in "${IMPLS[@]}"; do
    if [[ $i == kernel ]]; then row+=" – |"
    elif [[ -n ${CPU[$i]:-} ]]; then row+=" $(printf '%.2f' "${CPU[$i]}") s |"
    else row+=" ? |"; fi
  done
  for p in "${PAIRS[@]}"; do row+=" |"; done
  printf '%s\n' "$row"
  if ((${#WARNINGS[@]})); then
    printf '\n(!) warnings:\n'
    for a in "${WARNINGS[@]}"; do printf -- '- %s\n' "$a"; done
  fi
}
TABLE=$(table)
printf '\n%s\n\n(total %s s; logs in %s)\n' "$TABLE" "$ELAPSED" "$( ((KEEP)) && echo "$LOGDIR" || echo "the deleted work dir; use --keep")"
if [[ -n $OUT ]]; then
  printf '%s\n' "$TABLE" >"$OUT"
  log "table written to $OUT"
fi
