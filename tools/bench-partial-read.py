#!/usr/bin/env python3
"""Cold sequential read of a 64 MiB file through partial-file layers, against a whole file.

    python3 tools/bench-partial-read.py LEVELS BLOCKS [LEVELS BLOCKS ...]

For each pair: a volume whose base holds a 64 MiB file; LEVELS snapshots, each after BLOCKS
random 4 KiB writes into the file (so the file is a chain of LEVELS partial files over the
base), mounted with squash off. The same data as one whole file in a single-layer volume is the
baseline. Prints the medians of 7 cold-cache reads (sync + drop_caches before each) and the
throughput ratio whole/layered. Env: LAYERVOL (binary), BENCH_WORKDIR (/var/tmp/...).
"""
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LV = os.environ.get("LAYERVOL", os.path.join(HERE, "..", "target", "release", "layervol"))
WORK = os.environ.get("BENCH_WORKDIR", "/var/tmp/layervol-bench-partial")
SIZE = 64 << 20


def lv(*args):
    subprocess.run([LV, *args], check=True, capture_output=True)


def cold_read(path):
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.monotonic() - t0


def volume(name, src_file):
    d = os.path.join(WORK, name)
    if os.path.ismount(os.path.join(d, "m")):
        subprocess.run(["umount", os.path.join(d, "m")])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "src"))
    os.makedirs(os.path.join(d, "m"))
    shutil.copyfile(src_file, os.path.join(d, "src", "big"))
    lv("volume", "create", os.path.join(d, "vol"), "--from", os.path.join(d, "src"))
    lv("mount", os.path.join(d, "vol"), os.path.join(d, "m"), "-o", "max_layers=0")
    return d


def main():
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    try:
        args = [int(a) for a in sys.argv[1:]]
    except ValueError:
        args = []
    if not args or len(args) % 2 or min(args) < 1:
        sys.exit("usage: bench-partial-read.py LEVELS BLOCKS [LEVELS BLOCKS ...] (positive numbers; --help)")
    os.makedirs(WORK, exist_ok=True)
    base = os.path.join(WORK, "base.dat")
    with open(base, "wb") as f:
        f.write(os.urandom(SIZE))
    for levels, blocks in zip(args[::2], args[1::2]):
        d = volume("layered", base)
        mnt = os.path.join(d, "m")
        rng = random.Random(1)
        data = os.urandom(4096)
        for _ in range(levels):
            fd = os.open(os.path.join(mnt, "big"), os.O_WRONLY)
            for b in rng.sample(range(SIZE // 4096), blocks):
                os.pwrite(fd, data, b * 4096)
            os.close(fd)
            lv("snapshot", mnt)
        subprocess.run(["umount", mnt], check=True)
        lv("mount", os.path.join(d, "vol"), mnt, "-o", "max_layers=0")
        whole_src = os.path.join(WORK, "whole.dat")
        shutil.copyfile(os.path.join(mnt, "big"), whole_src)
        w = volume("whole", whole_src)
        layered, whole = [], []
        for _ in range(7):
            whole.append(cold_read(os.path.join(w, "m", "big")))
            layered.append(cold_read(os.path.join(mnt, "big")))
        subprocess.run(["umount", mnt, os.path.join(w, "m")], check=True)
        lm, wm = statistics.median(layered), statistics.median(whole)
        print(f"{levels} partial levels x {blocks} blocks: layered {lm:.3f} s, "
              f"whole {wm:.3f} s, throughput ratio {wm / lm:.2f}", flush=True)


if __name__ == "__main__":
    main()
