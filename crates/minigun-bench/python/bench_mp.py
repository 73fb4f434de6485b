#!/usr/bin/env python3
"""W1-W5 of minigun-bench with Python multiprocessing (fork start method), and W8a with asyncio, for comparison.

Standard library only; runs with the system python3.

    python3 bench_mp.py [--quick] [--json] [--only W1,W3]

Prints the same fields as `minigun-bench --json` (runner "python", executor "python-mp").

- W1 fork overhead: Pool(k, maxtasksperchild=1).map(f, 2000 items, chunksize=1): one new
  process per item, f(x) = 2x, k = 2 and 4.
- W2 IPC throughput: Pool(k).map(f, range(1_000_000), chunksize=c) for several c; the best
  chunksize is reported (and every one in the note).
- W3 large payloads: Pool(2).imap(checksum, 2000 bytes objects of 64 KiB). The checksum is
  zlib.adler32 (C speed), so the row measures moving the bytes, not a Python loop.
- W4 copy-on-write sharing: a 1 GiB bytes object built before the pool forks;
  Pool(4, maxtasksperchild=1) sums a random 1 MiB slice per item (sum(), as specified: this
  is Python-speed work of several ms per item). PSS of the parent and its live children
  sampled every ~20 ms. A second variant keeps the data in an anonymous mmap, 2 MiB aligned,
  with madvise(MADV_HUGEPAGE).
- W4b large ordinary heap data: a dict of millions of small str keys (about 1 GiB) built
  before the pool forks; Pool(4, maxtasksperchild=1), 1,000 random lookups per item.
- W5 CPU-bound: 5 ms of spinning per item (calibrated in Python) on Pool(2); floor = the
  ideal rate 2 / 5 ms.
- W8a async waits: 20,000 coroutines that each await asyncio.sleep(0.02) under an
  asyncio.Semaphore(1000) (executor "python-asyncio"); floor = the ideal rate 1000 / 20 ms.
"""

import argparse
import asyncio
import ctypes
import json
import mmap
import multiprocessing as mp
import os
import random
import resource
import sys
import threading
import time
import zlib

MIB = 1 << 20
ITEM = 64 << 10
MASK = (1 << 64) - 1
SPIN_TARGET = 0.005

# Set in the parent before a pool forks, read by the children (copy-on-write).
DATA = None
DATA_OFF = 0
SPIN_ITERS = 0


def progress(msg):
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def peak_rss():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return own, kids


def row(workload, variant, workers, items, wall, floor=None, note="", **extra):
    own, kids = peak_rss()
    ips = items / wall
    r = {
        "workload": workload,
        "runner": "python",
        "executor": "python-mp",
        "variant": variant,
        "workers": workers,
        "items": items,
        "wall_secs": wall,
        "items_per_sec": ips,
        "floor_items_per_sec": floor,
        "ratio": (ips / floor) if floor else None,
        "peak_rss_bytes": own,
        "peak_rss_children_bytes": kids,
    }
    r.update(extra)
    if note:
        r["note"] = note
    return r


def best_of(reps, f):
    best = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = f()
        t = time.perf_counter() - t0
        if best is None or t < best[0]:
            best = (t, result)
    return best


# ---------------------------------------------------------------- W1


def double(x):
    return x * 2


def w1(cfg):
    items = 300 if cfg.quick else 2000
    rows = []
    for k in (2, 4):
        progress(f"W1 Pool({k}, maxtasksperchild=1)")

        def run():
            with mp.Pool(k, maxtasksperchild=1) as pool:
                return sum(pool.map(double, range(items), chunksize=1))

        wall, total = best_of(cfg.reps, run)
        assert total == items * (items - 1), "W1: wrong sum"
        rows.append(row("W1", "maxtasksperchild=1", k, items, wall))
    return rows


# ---------------------------------------------------------------- W2


def w2(cfg):
    items = 200_000 if cfg.quick else 1_000_000
    chunks = (10_000, 100_000) if cfg.quick else (1_000, 10_000, 50_000, 100_000, 250_000)
    expect = items * (items - 1)
    rows = []
    for k in (2, 4):
        results = []
        for c in chunks:
            progress(f"W2 Pool({k}).map chunksize={c}")

            def run():
                with mp.Pool(k) as pool:
                    return sum(pool.map(double, range(items), chunksize=c))

            wall, total = best_of(1, run)
            assert total == expect, "W2: wrong sum"
            results.append((wall, c))
        _, best_c = min(results)
        wall, total = best_of(cfg.reps, lambda: _w2_run(k, items, best_c))
        assert total == expect, "W2: wrong sum"
        sweep = " ".join(f"{c}:{items / w:.0f}/s" for w, c in results)
        rows.append(
            row("W2", f"best chunksize={best_c}", k, items, wall,
                note=f"chunksize sweep (single runs): {sweep}")
        )
    return rows


def _w2_run(k, items, c):
    with mp.Pool(k) as pool:
        return sum(pool.map(double, range(items), chunksize=c))


# ---------------------------------------------------------------- W3


def checksum(b):
    return zlib.adler32(b)


def w3(cfg):
    items = 500 if cfg.quick else 2000
    template = bytes((i % 251) + 1 for i in range(ITEM))

    def payloads():
        for i in range(items):
            yield i.to_bytes(8, "little") + template[8:]

    expect = sum(zlib.adler32(p) for p in payloads())
    progress("W3 Pool(2).imap over 64 KiB bytes")

    def run():
        with mp.Pool(2) as pool:
            return sum(pool.imap(checksum, payloads()))

    wall, total = best_of(cfg.reps, run)
    assert total == expect, "W3: wrong sum"
    mbps = items * ITEM / 1e6 / wall
    return [row("W3", "imap, adler32", 2, items, wall, mb_per_sec=mbps)]


# ---------------------------------------------------------------- W4


def smaps_field(pid, field):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children_of(parent):
    """Children from /proc/<parent>/task/*/children, or a /proc scan without it."""
    try:
        out = []
        for tid in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    out.extend(int(p) for p in f.read().split())
            except OSError:
                pass
        return out
    except OSError:
        pass
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(")") + 1:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            out.append(int(name))
    return out


class PssSampler:
    """Largest summed PSS of this process and its live children, sampled every ~20 ms.

    A sample is kept only if the set of children is the same before and after reading it
    (a fork or exit in between changes every shared page's share and skews the sum)."""

    def __init__(self, every=0.02):
        self.every = every
        self.stop = threading.Event()
        self.max = 0
        self.kept = 0
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        me = os.getpid()
        while not self.stop.is_set():
            for _ in range(20):  # retry an inconsistent read at once, up to 20 times per tick
                before = sorted(children_of(me))
                total = smaps_field(me, "Pss")
                for c in before:
                    total += smaps_field(c, "Pss")
                if sorted(children_of(me)) == before:
                    self.max = max(self.max, total)
                    self.kept += 1
                    break
                self.dropped += 1
            self.stop.wait(self.every)

    def finish(self):
        self.stop.set()
        self.thread.join()
        return self.max, self.kept, self.dropped


def slice_sum(off):
    o = DATA_OFF + off
    return sum(DATA[o:o + MIB])


def build_data(size, huge):
    block = bytes(range(1, 256)) * (MIB // 255 + 1)
    block = block[:MIB]
    if not huge:
        return block * (size // MIB), 0
    m = mmap.mmap(-1, size + 2 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = (-addr) % (2 * MIB)
    m.madvise(mmap.MADV_HUGEPAGE, start, size)
    for i in range(0, size, MIB):
        m[start + i:start + i + MIB] = block
    return m, start


def w4(cfg):
    global DATA, DATA_OFF
    size = (128 << 20) if cfg.quick else (1 << 30)
    items = 40 if cfg.quick else 200
    rows = []
    rng = random.Random(4)
    offsets = [rng.randrange(0, size - MIB + 1) for _ in range(items)]
    for huge in (False, True):
        label = "mmap+MADV_HUGEPAGE" if huge else "bytes, 4 KiB pages"
        progress(f"W4 building a {size >> 20} MiB dataset ({label})")
        t0 = time.perf_counter()
        DATA, DATA_OFF = build_data(size, huge)
        build = time.perf_counter() - t0
        me = os.getpid()
        info = (f"dataset {size >> 20} MiB built in {build:.2f}s, AnonHugePages "
                f"{smaps_field(me, 'AnonHugePages') / MIB:.0f} MiB, parent PSS before run "
                f"{smaps_field(me, 'Pss') / MIB:.0f} MiB")
        progress(info)
        progress(f"W4 Pool(4, maxtasksperchild=1) ({label})")
        sampler = PssSampler()
        t0 = time.perf_counter()
        with mp.Pool(4, maxtasksperchild=1) as pool:
            total = sum(pool.map(slice_sum, offsets, chunksize=1))
        wall = time.perf_counter() - t0
        pss, kept, dropped = sampler.finish()
        expect = sum(slice_sum(o) for o in offsets)
        assert total == expect, "W4: wrong sum"
        rows.append(row("W4", label, 4, items, wall, pss_bytes=pss if kept else None,
                        note=f"sum() over 1 MiB in Python per item; {kept} consistent PSS "
                             f"samples, {dropped} dropped; {info}"))
        if huge:
            DATA.close()
        DATA = None
    return rows


# ---------------------------------------------------------------- W4b

LOOKUPS = 1000


def w4b_key(i):
    return f"key:{i:016x}:".ljust(40, ".")


def w4b_lookups(seed):
    rng = random.Random(seed)
    keys = len(HEAP)
    return sum(HEAP[w4b_key(rng.randrange(keys))] for _ in range(LOOKUPS)) & MASK


def w4b(cfg):
    """A dict of millions of small str keys (about 1 GiB; quick about 300 MiB) built before
    the pool forks; Pool(4, maxtasksperchild=1), 1,000 random lookups per item."""
    global HEAP
    keys = 2_000_000 if cfg.quick else 6_000_000
    items = 40 if cfg.quick else 200
    progress(f"W4b building a dict of {keys} str keys")
    t0 = time.perf_counter()
    HEAP = {w4b_key(i): (i * 0x9E3779B9) & MASK for i in range(keys)}
    build = time.perf_counter() - t0
    me = os.getpid()
    info = (f"{keys} keys, {smaps_field(me, 'Anonymous') / MIB:.0f} MiB anonymous memory, "
            f"built in {build:.2f}s")
    progress(info)
    progress("W4b Pool(4, maxtasksperchild=1)")
    sampler = PssSampler()
    t0 = time.perf_counter()
    with mp.Pool(4, maxtasksperchild=1) as pool:
        total = sum(pool.map(w4b_lookups, range(items), chunksize=1))
    wall = time.perf_counter() - t0
    pss, kept, dropped = sampler.finish()
    assert total == sum(w4b_lookups(i) for i in range(items)), "W4b: wrong sum"
    HEAP = None
    return [row("W4b", "dict, fork per item", 4, items, wall, pss_bytes=pss if kept else None,
                note=f"{kept} consistent PSS samples, {dropped} dropped; {info}")]


# ---------------------------------------------------------------- W5


def spin(iters, seed=1):
    x = seed
    for _ in range(iters):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK
    return x


def spin_item(i):
    return spin(SPIN_ITERS, i)


def calibrate():
    """Iterations that take 5 ms, rescaled until one call (fastest of 5) is within 1%."""
    def measure(iters):
        best = None
        for i in range(5):
            t0 = time.perf_counter()
            spin(iters, i)
            t = time.perf_counter() - t0
            best = t if best is None else min(best, t)
        return best

    iters = 20_000
    t = measure(iters)
    for _ in range(10):
        err = t / SPIN_TARGET
        if abs(err - 1) < 0.01:
            break
        iters = max(1, int(iters / err))
        t = measure(iters)
    return iters, t


def w5(cfg):
    global SPIN_ITERS
    items = 100 if cfg.quick else 2000
    progress("W5 calibrating the 5 ms spin")
    SPIN_ITERS, one = calibrate()
    progress(f"spin calibrated to {SPIN_ITERS} iterations = {one * 1e3:.3f} ms alone")
    ideal = 2 / one  # every worker busy all the time with items of the calibrated length
    progress("W5 Pool(2).map")
    t0 = time.perf_counter()
    with mp.Pool(2) as pool:
        pool.map(spin_item, range(items), chunksize=1)
    wall = time.perf_counter() - t0
    return [row("W5", "5 ms spin per item", 2, items, wall, floor=ideal,
                note=f"wall = {ideal / (items / wall):.3f}x ideal; spin calibrated to "
                     f"{SPIN_ITERS} iterations = {one * 1e3:.3f} ms alone")]


# ---------------------------------------------------------------- W8


async def _w8a_run(items, n, wait):
    sem = asyncio.Semaphore(n)

    async def one(x):
        async with sem:
            await asyncio.sleep(wait)
            return x

    return sum(await asyncio.gather(*(one(x) for x in range(items))))


def w8(cfg):
    items = 4000 if cfg.quick else 20000
    n, wait = 1000, 0.02
    progress(f"W8a asyncio: {items} items awaiting 20 ms under Semaphore({n})")
    wall, total = best_of(cfg.reps, lambda: asyncio.run(_w8a_run(items, n, wait)))
    assert total == items * (items - 1) // 2
    r = row("W8", "a: await 20 ms timer", n, items, wall, floor=n / wait,
            note="floor = ideal n / 20 ms")
    r["executor"] = "python-asyncio"
    return [r]


# ---------------------------------------------------------------- main

WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W4B": w4b, "W5": w5, "W8": w8}


def print_table(rows):
    print(f"{'id':<3} {'variant':<26} {'wk':>3} {'items':>8} {'items/s':>11} "
          f"{'floor/s':>9} {'ratio':>7} {'MB/s':>7} {'PSS MiB':>8} {'RSS MiB':>8}")
    for r in rows:
        floor = r.get("floor_items_per_sec")
        ratio = r.get("ratio")
        mbps = r.get("mb_per_sec")
        pss = r.get("pss_bytes")
        print(f"{r['workload']:<3} {r['variant'][:26]:<26} {r['workers']:>3} {r['items']:>8} "
              f"{r['items_per_sec']:>11.0f} {'-' if floor is None else f'{floor:.0f}':>9} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>7} "
              f"{'-' if mbps is None else f'{mbps:.0f}':>7} "
              f"{'-' if pss is None else f'{pss / MIB:.0f}':>8} "
              f"{r['peak_rss_bytes'] / MIB:>8.1f}")
    for r in rows:
        if r.get("note"):
            print(f"  {r['workload']} [{r['variant']}]: {r['note']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI)")
    ap.add_argument("--json", action="store_true", help="print a JSON array")
    ap.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W3")
    ap.add_argument("--reps", type=int, default=0, help="repetitions of short measurements")
    cfg = ap.parse_args()
    if cfg.reps <= 0:
        cfg.reps = 1 if cfg.quick else 3
    mp.set_start_method("fork")
    selected = [w.strip().upper() for w in cfg.only.split(",") if w.strip()] or list(WORKLOADS)
    # The Rust bench has W6 (in-process) too; Python has no counterpart: skip it quietly.
    selected = [w for w in selected if w != "W6"]
    for w in selected:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w} (W1..W5)")
    rows = []
    for w in selected:
        print(f"[python {w}]", file=sys.stderr, flush=True)
        rows.extend(WORKLOADS[w](cfg))
    if cfg.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
