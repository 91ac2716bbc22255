#!/usr/bin/env bash
# tools/bench-rss.sh — peak RSS of the layervol daemon after `ls -lR` and a full read of a
# 100 000-file tree (issue target: <= 150 MiB).
#
# Usage: sudo tools/bench-rss.sh [FILES]     (default 100000 files, 100 per directory)
# Env:   LAYERVOL (default <script dir>/../target/release/layervol),
#        BENCH_WORKDIR (default /var/tmp/layervol-rss; the tree is cached there)
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
files=${1:-100000}
[[ $files =~ ^[1-9][0-9]*$ ]] || { echo "bench-rss: FILES must be a positive number, not '$files' (--help)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
lv=${LAYERVOL:-$here/../target/release/layervol}
w=${BENCH_WORKDIR:-/var/tmp/layervol-rss}
[ "$(id -u)" = 0 ] || { echo "bench-rss: must run as root" >&2; exit 1; }
[ -x "$lv" ] || { echo "bench-rss: no layervol binary at $lv (cargo build --release)" >&2; exit 1; }
tree=$w/lower-$files
if [ ! -e "$tree.complete" ]; then
  echo "[rss] building a tree of $files files in $tree"
  rm -rf "$tree"; mkdir -p "$tree"
  dirs=$(( (files + 99) / 100 ))
  for ((d = 0; d < dirs; d++)); do
    mkdir "$tree/d$d"
    for ((f = 0; f < 100 && d * 100 + f < files; f++)); do
      printf 'file %d/%d\n' "$d" "$f" > "$tree/d$d/f$f"
    done
  done
  touch "$tree.complete"
fi
run=$w/run; mnt=$run/mnt
umount "$mnt" 2>/dev/null || true
rm -rf "$run"; mkdir -p "$run/upper" "$run/work" "$mnt"
"$lv" -o "lowerdir=$tree,upperdir=$run/upper,workdir=$run/work" "$mnt"
trap 'umount "$mnt" 2>/dev/null || true' EXIT
pid=$(pgrep -f -- "layervol -o lowerdir=$tree,upperdir=$run/upper" | tail -n1)
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(date +%s.%N); ls -lR "$mnt" > /dev/null; e=$(date +%s.%N)
echo "[rss] ls -lR: $(echo "$e - $s" | bc) s, VmHWM $(awk '/VmHWM/ {print $2, $3}' /proc/$pid/status)"
s=$(date +%s.%N); find "$mnt" -type f -exec cat {} + > /dev/null; e=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
echo "[rss] read all: $(echo "$e - $s" | bc) s, VmHWM $hwm kB"
echo "layervol daemon peak RSS after ls -lR + full read of $files files: $((hwm / 1024)) MiB (target <= 150 MiB)"
