#!/usr/bin/env python3
"""Volume-mode benchmarks (issue: live snapshots, block-level copy-up). Run as root:

    python3 tools/bench-volume.py [--quick] [--only delta,freeze,chain]

delta   1000 random 4 KiB writes to distinct blocks of a 1 GiB lower file, then a snapshot:
        size of the new layer (allocated bytes) against the 4 MiB written, and what kernel
        overlayfs copies up for the same writes (its upper).
freeze  snapshot duration with a writer running (4000 random 4 KiB writes/s), on a volume holding
        4 GiB versus one holding 64 MiB: total and in-daemon (write barrier) times, p50/p99.
chain   sequential read of a 64 MiB file after 200 snapshots with writes between them, as
        mounted by default (the daemon squashes online above 16 frozen layers), against the
        same data in a single-layer volume, and stat of 1000 files through the same stacks;
        also with squash off (partial files chained 200 deep) and after an offline squash.

Prints a markdown table at the end. Env: LAYERVOL (binary), BENCH_WORKDIR (/var/tmp/...).
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LV = os.environ.get("LAYERVOL", os.path.join(HERE, "..", "target", "release", "layervol"))
WORK = os.environ.get("BENCH_WORKDIR", "/var/tmp/layervol-bench-volume")
_parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
)
_parser.add_argument("--quick", action="store_true", help="fewer snapshots and rounds (a smoke run)")
_parser.add_argument(
    "--only", metavar="LIST", help="comma-separated subset of: delta,freeze,chain (default: all)"
)
_parser.add_argument(
    "--writer-rate", type=int, default=4000, metavar="N",
    help="random 4 KiB writes per second of the freeze rows' writer (default 4000; 0: as fast "
    "as it can, a harder test of the barrier whose totals then follow the writer's speed)",
)
_args = _parser.parse_args()
QUICK = _args.quick
ONLY = set(_args.only.split(",")) if _args.only else None
if ONLY and not ONLY <= {"delta", "freeze", "chain"}:
    _parser.error(f"--only: unknown measurement(s) {', '.join(sorted(ONLY - {'delta', 'freeze', 'chain'}))}")
ENV = dict(os.environ, LAYERVOL_RUN_DIR=os.path.join(WORK, "run"))
rows = []


def sh(*args, **kw):
    return subprocess.run(args, check=True, env=ENV, capture_output=True, text=True, **kw).stdout


def lv(*args):
    return sh(LV, *args)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def allocated(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(d, f)).st_blocks * 512
    return total


def fresh(name):
    p = os.path.join(WORK, name)
    if os.path.ismount(os.path.join(p, "m")):
        subprocess.run(["umount", "-l", os.path.join(p, "m")])
    shutil.rmtree(p, ignore_errors=True)
    os.makedirs(os.path.join(p, "src"))
    os.makedirs(os.path.join(p, "m"))
    return p


def random_file(path, size):
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)


def random_writes(path, blocks, count, rng):
    fd = os.open(path, os.O_WRONLY)
    chosen = rng.sample(range(blocks), count)
    data = os.urandom(4096)
    for b in chosen:
        os.pwrite(fd, data, b * 4096)
    os.close(fd)


def delta():
    size = (64 << 20) if QUICK else (1 << 30)
    p = fresh("delta")
    random_file(os.path.join(p, "src/big"), size)
    lv("volume", "create", os.path.join(p, "vol"), "--from", os.path.join(p, "src"))
    lv("mount", os.path.join(p, "vol"), os.path.join(p, "m"))
    rng = random.Random(1)
    random_writes(os.path.join(p, "m/big"), size // 4096, 1000, rng)
    snap = json.loads(lv("snapshot", os.path.join(p, "m"), "--json"))
    layer = os.path.join(p, "vol/layers", str(snap["frozen_epoch"]), "tree")
    held = allocated(layer)
    sh("umount", os.path.join(p, "m"))
    # kernel overlayfs, same writes
    k = os.path.join(p, "k")
    for d in ("u", "w", "km"):
        os.makedirs(os.path.join(k, d))
    sh("mount", "-t", "overlay", "overlay", "-o",
       f"lowerdir={p}/src,upperdir={k}/u,workdir={k}/w", f"{k}/km")
    random_writes(f"{k}/km/big", size // 4096, 1000, random.Random(1))
    sh("umount", f"{k}/km")
    kheld = allocated(f"{k}/u")
    written = 1000 * 4096
    rows.append(("delta: new layer after 1000 x 4 KiB writes into a %d MiB file" % (size >> 20),
                 f"{held / 2**20:.2f} MiB", f"{held / written:.2f} x written (target <= 1.2)",
                 f"kernel overlayfs upper: {kheld / 2**20:.0f} MiB"))


def freeze_run(name, size, n):
    p = fresh(name)
    src = os.path.join(p, "src/big")
    with open(src, "wb") as f:
        f.truncate(size)
    subprocess.run(["fallocate", "-l", str(size), src], check=True)
    lv("volume", "create", os.path.join(p, "vol"), "--from", os.path.join(p, "src"))
    mnt = os.path.join(p, "m")
    lv("mount", os.path.join(p, "vol"), mnt)
    # Writeback left by the setup or by the rows before (the delta row copies 1 GiB up on
    # kernel overlayfs) would otherwise fall on whichever volume is measured first.
    os.sync()
    stop = threading.Event()

    def writer():
        # Paced (WRITES_PER_SEC), so that every snapshot of both volumes has about the same
        # data to flush: unpaced, the writer's speed (which differs between a 64 MiB and a
        # sparse 4 GiB file, and with the disk's state) decided the totals, not the volume.
        fd = os.open(os.path.join(mnt, "big"), os.O_WRONLY)
        rng = random.Random(2)
        data = os.urandom(4096)
        t0, done = time.monotonic(), 0
        burst = max(WRITES_PER_SEC // 100, 1)
        while not stop.is_set():
            for _ in range(burst):
                os.pwrite(fd, data, rng.randrange(size // 4096) * 4096)
            done += burst
            ahead = t0 + done / WRITES_PER_SEC - time.monotonic() if WRITES_PER_SEC else 0
            if ahead > 0:
                time.sleep(ahead)
        os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    total, barrier, wait, attrs, maps, written, dirty = [], [], [], [], [], [], []
    for _ in range(n):
        s = json.loads(lv("snapshot", mnt, "--json"))
        total.append(s["total_micros"] / 1000)
        dirty.append(s.get("dirty_bytes", 0) / (1 << 20))
        barrier.append(s["barrier_micros"] / 1000)
        wait.append(s.get("barrier_wait_micros", 0) / 1000)
        attrs.append(s.get("barrier_attrs_micros", 0) / 1000)
        maps.append(s.get("barrier_maps_micros", 0) / 1000)
        written.append(s.get("maps_written_under_barrier", 0))
        time.sleep(0.02)
    stop.set()
    t.join()
    sh("umount", mnt)
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]
    return (q(total, 50), q(total, 99), q(barrier, 50), q(barrier, 99), q(wait, 99),
            q(attrs, 99), q(maps, 99), sum(written), n, statistics.median(dirty))


# The freeze rows' writer: random 4 KiB writes per second (4000: 16 MiB/s; 0: unpaced).
WRITES_PER_SEC = _args.writer_rate


def freeze():
    n = 20 if QUICK else 100
    small = freeze_run("freeze-small", 64 << 20, n)
    big = freeze_run("freeze-big", (256 << 20) if QUICK else (4 << 30), n)
    rows.append(("freeze, 64 MiB volume, writer running (ms)",
                 f"total p50 {small[0]:.1f} p99 {small[1]:.1f} (dirty per snapshot p50 {small[9]:.1f} MiB)",
                 f"barrier p50 {small[2]:.2f} p99 {small[3]:.2f} (p99 of: waiting {small[4]:.2f}, root attrs {small[5]:.2f}, maps {small[6]:.2f}; maps written under it in {small[7]} of {small[8]} snapshots)",
                 ""))
    rows.append(("freeze, %s volume, writer running (ms)" % ("256 MiB" if QUICK else "4 GiB"),
                 f"total p50 {big[0]:.1f} p99 {big[1]:.1f} (dirty per snapshot p50 {big[9]:.1f} MiB)",
                 f"barrier p50 {big[2]:.2f} p99 {big[3]:.2f} (p99 of: waiting {big[4]:.2f}, root attrs {big[5]:.2f}, maps {big[6]:.2f}; maps written under it in {big[7]} of {big[8]} snapshots)",
                 f"ratio big/small total p50 {big[0] / small[0]:.2f} (target <= 1.5)"))


REPS = 3 if QUICK else 7


def read_once(path):
    drop_caches()
    t0 = time.monotonic()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return time.monotonic() - t0


def stat_once(d, names):
    drop_caches()
    t0 = time.monotonic()
    for n in names:
        os.lstat(os.path.join(d, n))
    return time.monotonic() - t0


def medians(fn, *subjects):
    """Median of REPS cold-cache runs of `fn` on each subject, the subjects taken in turn in
    each round so that drift on this noisy machine (writeback, a squash's aftermath) falls on
    all of them alike."""
    times = [[] for _ in subjects]
    for _ in range(REPS):
        for t, s in zip(times, subjects):
            t.append(fn(*s))
    return [statistics.median(t) for t in times]


def chain_volume(name, size, names, snaps, opts):
    """A volume with a 64 MiB file and 1000 small ones, then `snaps` snapshots with 16 random
    4 KiB writes before each, mounted with `opts`. Returns (dir, mountpoint, seconds)."""
    p = fresh(name)
    random_file(os.path.join(p, "src/big"), size)
    os.makedirs(os.path.join(p, "src/files"))
    for n in names:
        with open(os.path.join(p, "src/files", n), "w") as f:
            f.write(n)
    lv("volume", "create", os.path.join(p, "vol"), "--from", os.path.join(p, "src"))
    mnt = os.path.join(p, "m")
    lv("mount", os.path.join(p, "vol"), mnt, *opts)
    rng = random.Random(3)
    t0 = time.monotonic()
    for _ in range(snaps):
        random_writes(os.path.join(mnt, "big"), size // 4096, 16, rng)
        lv("snapshot", mnt)
    return p, mnt, time.monotonic() - t0


def frozen_count(mnt):
    st = json.loads(lv("status", mnt, "--json"))
    return sum(1 for l in st["layers"] if l["state"] == "frozen"), st


def chain():
    snaps = 20 if QUICK else 200
    size = 64 << 20
    names = [f"f{i}" for i in range(1000)]
    # As mounted by default: the daemon squashes online above 16 frozen layers.
    p, mnt, loop_s = chain_volume("chain", size, names, snaps, [])
    # Measure the state the daemon settles in: no squash running any more.
    deadline = time.monotonic() + 120
    while True:
        n, st = frozen_count(mnt)
        if (n <= 16 and not st.get("squash_running")) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    last = st.get("last_squash") or {}
    # The same data in a single-layer volume, measured in turn with the squash-on mount.
    f = fresh("chain-flat")
    shutil.copytree(os.path.join(p, "src/files"), os.path.join(f, "src/files"))
    shutil.copyfile(os.path.join(mnt, "big"), os.path.join(f, "src/big"))
    lv("volume", "create", os.path.join(f, "vol"), "--from", os.path.join(f, "src"))
    fm = os.path.join(f, "m")
    lv("mount", os.path.join(f, "vol"), fm)
    auto, flat = medians(read_once, (os.path.join(mnt, "big"),), (os.path.join(fm, "big"),))
    auto_stat, flat_stat = medians(
        stat_once, (os.path.join(mnt, "files"), names), (os.path.join(fm, "files"), names))
    sh("umount", mnt)
    # The same workload with squash off: 200 layers, partial files chained 200 deep.
    q, qm, _ = chain_volume("chain-off", size, names, snaps, ["-o", "max_layers=0"])
    sh("umount", qm)
    lv("mount", os.path.join(q, "vol"), qm)
    t0 = time.monotonic()
    lv("volume", "squash", os.path.join(p, "vol"))
    squash_s = time.monotonic() - t0
    lv("mount", os.path.join(p, "vol"), mnt)
    deep, squashed, flat2 = medians(
        read_once, (os.path.join(qm, "big"),), (os.path.join(mnt, "big"),), (os.path.join(fm, "big"),))
    deep_stat, squashed_stat, flat2_stat = medians(
        stat_once, *((os.path.join(m, "files"), names) for m in (qm, mnt, fm)))
    for m in (qm, mnt, fm):
        sh("umount", m)
    rows.append((f"sequential read of 64 MiB after {snaps} snapshots, squash on (default max_layers=16) (s)",
                 f"{auto:.3f} with {n} frozen layers; single layer {flat:.3f}",
                 f"throughput ratio {flat / auto:.2f} (target >= 0.8)",
                 f"{snaps} write+snapshot rounds took {loop_s:.1f} s with online squashes "
                 f"(last: {len(last.get('merged_epochs', []))} layers merged in "
                 f"{last.get('total_micros', 0) / 1e3:.0f} ms, writers paused "
                 f"{last.get('barrier_micros', 0) / 1e3:.1f} ms)"))
    rows.append((f"lstat of 1000 files after {snaps} snapshots, squash on (s)",
                 f"{auto_stat:.3f}; single layer {flat_stat:.3f}",
                 f"slowdown {auto_stat / flat_stat:.2f} (target <= 1.2)", ""))
    rows.append((f"same, squash off (max_layers=0, {snaps} layers) / after an offline squash (s)",
                 f"read {deep:.3f} / {squashed:.3f}; lstat {deep_stat:.3f} / {squashed_stat:.3f}; "
                 f"single layer {flat2:.3f}, {flat2_stat:.3f}",
                 f"read ratio {flat2 / deep:.2f} / {flat2 / squashed:.2f}; lstat {deep_stat / flat2_stat:.2f} / {squashed_stat / flat2_stat:.2f}",
                 f"offline squash of the squash-on volume: {squash_s:.2f} s"))


def main():
    if os.geteuid() != 0:
        sys.exit("bench-volume: must run as root")
    if not os.access(LV, os.X_OK):
        sys.exit(f"bench-volume: no layervol binary at {LV} (cargo build --release)")
    os.makedirs(WORK, exist_ok=True)
    for name, f in (("delta", delta), ("freeze", freeze), ("chain", chain)):
        if ONLY is None or name in ONLY:
            print(f"[bench-volume] {name} ...", flush=True)
            f()
    print("\n| measurement | result | against the target | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
