"""Benchmark: the tiler zoo over 624,610 sizes (vectorised vs a plain per-image loop of the same
rules) and the image-header scan (1 worker vs all cores). Prints markdown tables.

    .venv/bin/python bench/bench_tiling.py                       # both parts (what `make bench` runs)
    .venv/bin/python bench/bench_tiling.py --skip-scan           # the zoo only
    .venv/bin/python bench/bench_tiling.py --skip-scan --loop-sizes 20000 --repeats 3

Sizes: the 118,287 real COCO train2017 sizes (embedded) repeated 5 times (591,435) plus the
first 33,175 rows of a seeded (seed 0) permutation of them = 624,610, the number of image
samples of LLaVA-1.5 665k. Tilers: the ten registered rules at their conf/tiler/NAME.yaml
settings (docs/design.md §5). Per tiler: the plain loop (``decide(w, h)``, the rule restated
for one size, on --loop-sizes sizes and scaled linearly to all), the vectorised rule
(``decide_many`` on all 624,610 sizes, no deduplication), and what the ablation job does
(``decide_all``: distinct sizes once, broadcast back; in this process). "identical" compares
every field (grid, crops, tokens, pixels, skip) of the loop with the vectorised answers.
Times are wall-clock (time.perf_counter), best of --repeats for the vectorised forms; the loop
is timed once. On a shared machine compare the ratios, and repeat when it is quiet.
Header scan: generated JPEG/PNG files (warm page cache), read with bluelm_v.data.image_sizes:
in this process (1 worker), and as Ray tasks with 1 CPU and with all CPUs (worker processes
started by a warm-up scan before timing), best of --repeats.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = 624_610
FIELDS = ("m", "n", "crops", "tokens", "pixels", "encoder_pixels", "skip")


def build_sizes():
    from bluelm_v.data.manifest import read_size_manifest

    coco = read_size_manifest()
    w, h = coco["width"].to_numpy(np.int64), coco["height"].to_numpy(np.int64)
    reps, extra = divmod(TARGET, len(w))
    pick = np.random.default_rng(0).permutation(len(w))[:extra]
    how = (f"{len(w):,} COCO train2017 sizes x {reps} = {len(w) * reps:,}, + {extra:,} rows of a seeded "
           f"permutation (seed 0) = {TARGET:,} sizes ({len(np.unique(w << 32 | h)):,} distinct)")
    return np.concatenate([np.tile(w, reps), w[pick]]), np.concatenate([np.tile(h, reps), h[pick]]), how


def make_tilers(names=None):
    from bluelm_v.plugin_manager import get
    from bluelm_v.plugins.tilers.zoo import tiler_presets

    _, registry, _ = get()
    presets = tiler_presets()
    return {n: registry.tiler.create(n, **presets.get(n, (n, {}))[1]) for n in names or registry.tiler.names()}


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_selection(repeats: int, loop_sizes: int, names=None) -> None:
    from bluelm_v.plugins.tilers.zoo import decide_all

    w, h, how = build_sizes()
    tilers = make_tilers(names)
    print(f"## The tiler zoo over {len(w):,} sizes\n\nSizes: {how}.\n")
    print("| tiler | plain loop (s) | vectorised (s) | speed-up | job: distinct sizes (s) | speed-up | identical |")
    print("|---|---|---|---|---|---|---|")
    totals = np.zeros(3)
    k = min(loop_sizes, len(w))
    wl, hl = w[:k].tolist(), h[:k].tolist()
    for name, tiler in tilers.items():
        vec_s, d = best_of(lambda: tiler.decide_many(w, h), repeats)
        job_s, _ = best_of(lambda: decide_all({name: tiler}, w, h, shard_size=len(w)), repeats)
        t0 = time.perf_counter()
        loop = [tiler.decide(a, b) for a, b in zip(wl, hl)]
        loop_s = (time.perf_counter() - t0) * len(w) / k
        cols = {f: getattr(d, f)[:k].tolist() for f in FIELDS}
        same = all(r[f] == cols[f][i] for i, r in enumerate(loop) for f in FIELDS)
        totals += (loop_s, vec_s, job_s)
        print(f"| `{name}` | {loop_s:.1f} | {vec_s:.3f} | {loop_s / vec_s:.0f}x | {job_s:.3f} | "
              f"{loop_s / job_s:.0f}x | {'yes' if same else 'NO'} |")
    all_s, _ = best_of(lambda: decide_all(tilers, w, h, shard_size=len(w)), repeats)
    print(f"| **all {len(tilers)}** | {totals[0]:.1f} | {totals[1]:.3f} | {totals[0] / totals[1]:.0f}x | "
          f"{totals[2]:.3f} | {totals[0] / totals[2]:.0f}x | |")
    scaled = "" if k == len(w) else f" (loop timed on the first {k:,} sizes, scaled to {len(w):,})"
    print(f"\nvectorised = `decide_many` on all sizes (chunks of 16,384); job = `decide_all` (distinct sizes once, "
          f"broadcast back), one tiler at a time; all {len(tilers)} tilers in one `decide_all`: {all_s:.3f} s; "
          f"best of {repeats}{scaled}.\n")


def make_images(folder: Path, count: int) -> list[str]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        w, h = (int(x) for x in rng.integers(64, 1025, 2))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.rectangle((x0, y0, x0 + w // 4, y0 + h // 4), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f"img{i:05d}.{'jpg' if i % 2 == 0 else 'png'}"
        img.save(folder / name, quality=90) if name.endswith("jpg") else img.save(folder / name, compress_level=1)
        names.append(name)
    return names


def bench_scan(count: int, folder: str | None, repeats: int) -> None:
    import ray

    from bluelm_v.data.image_sizes import scan_image_sizes, scan_parallel

    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="bluelm_v_scan_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = sorted(p.name for p in root.iterdir() if p.suffix in (".jpg", ".png"))[:count]
    if len(names) < count:
        names = make_images(root, count)
    gen_s = time.perf_counter() - t0
    mb = sum((root / n).stat().st_size for n in names) / 1e6
    scan_image_sizes(root, names)  # warm the page cache
    rows = []
    secs, serial = best_of(lambda: scan_image_sizes(root, names), repeats)
    rows.append(("1 worker (this process)", secs))
    cpus = os.cpu_count() or 1
    for n_cpus in sorted({1, cpus}):
        ray.init(num_cpus=n_cpus, include_dashboard=False, log_to_driver=False)
        per_task = max(50, len(names) // (4 * n_cpus))
        scan_parallel(root, names[: per_task * n_cpus], files_per_task=per_task)  # start the workers
        secs, table = best_of(lambda: scan_parallel(root, names, files_per_task=per_task), repeats)
        rows.append((f"Ray tasks, {n_cpus} CPU{'s' if n_cpus > 1 else ''} ({per_task} files/task)", secs))
        assert [tuple(r) for r in table[["width", "height", "reason"]].itertuples(index=False)] == serial
        ray.shutdown()
    ok = sum(r[2] == "ok" for r in serial)
    print(f"## Header scan: {len(names):,} generated files (half JPEG, half PNG, 64-1024 px a side, {mb:.0f} MB; "
          f"generated in {gen_s:.1f} s; warm page cache; {ok:,} ok; best of {repeats})\n")
    print("| workers | seconds | images/s |\n|---|---|---|")
    for label, secs in rows:
        print(f"| {label} | {secs:.2f} | {len(names) / secs:,.0f} |")
    print(f"\n({cpus} cores on this machine.)\n")
    if not folder:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-sizes", type=int, default=TARGET, help="sizes the Python loop is timed on")
    ap.add_argument("--scan-files", type=int, default=3000)
    ap.add_argument("--scan-dir", help="keep the generated images here (default: a temp dir, removed)")
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--skip-selection", action="store_true")
    ap.add_argument("--tilers", nargs="*", help="registered tiler names (default: all)")
    args = ap.parse_args(argv)
    print(f"# bench_tiling ({os.cpu_count()} cores, Python {sys.version.split()[0]}, numpy {np.__version__})\n")
    if not args.skip_selection:
        bench_selection(args.repeats, args.loop_sizes, args.tilers)
    if not args.skip_scan:
        bench_scan(args.scan_files, args.scan_dir, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
