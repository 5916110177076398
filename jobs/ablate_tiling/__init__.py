"""Tiling ablation: every tiler's grid for every sample, the reference (relaxed) against each.

    python -m bluelm_v.launch +experiment=ablate_tiling          # embedded COCO train2017 sizes (make run)
    python -m bluelm_v.launch +experiment=ablate_tiling dataset.manifest=sizes.csv
    python -m bluelm_v.launch +experiment=ablate_tiling dataset.llava_json=llava_v1_5_mix665k.json \\
        dataset.image_root=playground/data
    python -m bluelm_v.launch +experiment=ablate_tiling 'ablation.tilers=[relaxed,llava_next,internvl,single]'
    python -m bluelm_v.launch +experiment=ablate_tiling 'ablation.overrides={relaxed: {alpha: 0.2}}'

Inputs (docs/design.md §2.4): a size manifest (CSV with width,height; default: the real sizes of the
118,287 COCO train2017 images shipped in bluelm_v/data) or a LLaVA-format JSON whose image
sizes are read from file headers in parallel Ray tasks and cached (bluelm_v.data).

Tiler parameters: for each name in ``ablation.tilers``, conf/tiler/NAME.yaml when the package
has one (the paper's ablation setting: grids up to 3x3, InternVL 1..9 tiles), else the
factory's defaults; ``ablation.overrides.NAME`` goes on top. The top-level ``tiler`` node is
the model's tiler and plays no part here.

Work: the distinct (width, height) sizes are split into shards of ``ablation.shard_size``; one
Ray task per shard runs every tiler's vectorised ``select_many``; answers are broadcast back to
the samples (per-sample counting: a size used by k samples counts k times).

Outputs in the run directory: decisions.parquet (width, height, T_m, T_n, T_crops, T_tokens per
tiler T, + the input's extra columns), skipped.csv (row, reason, ...), report.md + PNG plots,
and summary.json (what run() returns: counts, per-tiler statistics, REF_vs_T comparisons).
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np

from bluelm_v.errors import ConfigError

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others): the
# ablation's reference tiler takes its parameters from `tiler` (tiler.alpha=0.2 applies).
USES = ("tiler",)

DECISION_EXTRA_COLUMNS = ("row", "line", "id", "image", "source")


# -- configuration ---------------------------------------------------------------------------
def _plain(node):
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(node, resolve=True)
    return node


def tiler_params(cfg, name: str) -> tuple[dict, str]:
    """(parameters, where they came from) for one tiler of the ablation."""
    import yaml

    params, origin = {}, "factory defaults"
    conf = resources.files("bluelm_v.conf") / "tiler" / f"{name}.yaml"
    if conf.is_file():
        data = yaml.safe_load(conf.read_text()) or {}
        if data.get("name", name) == name:
            params, origin = {k: v for k, v in data.items() if k != "name"}, f"conf/tiler/{name}.yaml"
    extra = (_plain(cfg.ablation.get("overrides")) or {}).get(name)
    if extra:
        params.update(extra)
        origin += f" + ablation.overrides.{name}"
    return params, origin


def validate(cfg, registry) -> None:
    ab, ds = cfg.get("ablation"), cfg.get("dataset")
    if ab is None or ds is None:
        raise ConfigError("ablation: the ablate_tiling job needs the `ablation` and `dataset` nodes "
                          "(conf/job/ablate_tiling.yaml)")
    names = list(_plain(ab.get("tilers")) or [])
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"ablation.tilers: a non-empty list of tiler names, got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation.tilers: names must be unique, got {names}")
    overrides = _plain(ab.get("overrides")) or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError(f"ablation.overrides: a mapping tiler name -> parameters, got {overrides!r}")
    stray = sorted(set(overrides) - set(names))
    if stray:
        raise ConfigError(f"ablation.overrides.{stray[0]}: not one of ablation.tilers {names}")
    for i, name in enumerate(names):
        registry.tiler.entry(name, f"ablation.tilers[{i}]")  # unknown name: lists the registered ones
        params, _ = tiler_params(cfg, name)
        registry.tiler.validate(name, params, f"ablation.overrides.{name}" if name in overrides else f"ablation.tilers[{i}]")
    if ab.get("reference") not in names:
        raise ConfigError(f"ablation.reference: {ab.get('reference')!r} is not one of ablation.tilers {names}")
    for key in ("shard_size", "tokens_per_crop", "map_points"):
        value = ab.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"ablation.{key}: a positive integer, got {value!r}")
    if ds.get("manifest") and ds.get("llava_json"):
        raise ConfigError("dataset: set dataset.manifest or dataset.llava_json, not both")
    if ds.get("manifest"):
        if not Path(ds.manifest).is_file():
            raise ConfigError(f"dataset.manifest: no such file: {ds.manifest}")
        _read_manifest(ds.manifest)  # a malformed manifest fails here, before Ray starts
    if ds.get("llava_json"):
        if not Path(ds.llava_json).is_file():
            raise ConfigError(f"dataset.llava_json: no such file: {ds.llava_json}")
        if not ds.get("image_root") or not Path(ds.image_root).is_dir():
            raise ConfigError(f"dataset.image_root: the folder the JSON's image paths are relative to; "
                              f"got {ds.get('image_root')!r}, which is not a directory")
    if not isinstance(ds.get("files_per_task", 1000), int) or ds.get("files_per_task", 1000) < 1:
        raise ConfigError(f"dataset.files_per_task: a positive integer, got {ds.get('files_per_task')!r}")


# -- inputs ----------------------------------------------------------------------------------
_PARSED: dict = {}


def _read_manifest(path):
    """read_size_manifest, parsed once per (path, mtime) in this process (validate, then run)."""
    from bluelm_v.data.manifest import read_size_manifest

    if path is None:
        return read_size_manifest(None)
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _PARSED:
        _PARSED.clear()
        _PARSED[key] = read_size_manifest(path)
    return _PARSED[key].copy()


def load_samples(ctx):
    """(samples with width/height, skipped rows with a reason, dataset info)."""
    import pandas as pd

    from bluelm_v.data import manifest as mf

    ds = ctx.cfg.dataset
    if ds.get("llava_json"):
        from bluelm_v.data.llava_sizes import llava_samples

        cache_dir = Path(ds.cache_dir) if ds.get("cache_dir") else ctx.run_dir.resolve().parent / "size_cache"
        samples, skipped, info = llava_samples(
            ds.llava_json, ds.image_root, cache_dir, rescan=bool(ds.get("rescan", False)),
            files_per_task=int(ds.get("files_per_task", 1000)), check_end=bool(ds.get("check_end", True)),
            progress=ctx.progress)
        info = {"kind": "llava_json", "path": str(ds.llava_json), "image_root": str(ds.image_root),
                "row_means": "record index (.json) or line (.jsonl)", **info}
    else:
        table = _read_manifest(ds.get("manifest"))
        embedded = not ds.get("manifest")
        info = {"kind": "embedded_coco2017_train" if embedded else "manifest",
                "path": mf.COCO_TRAIN2017_FILE if embedded else str(ds.manifest),
                "row_means": "line of the manifest file (header = line 1)"}
        samples, skipped = mf.split_bad_sizes(table.rename(columns={"line": "row"}))
    good, bad = mf.split_bad_sizes(samples)
    skipped = pd.concat([skipped, bad], ignore_index=True)
    info["n_input_rows"] = int(len(good) + len(skipped))
    return good, skipped, info


# -- the Ray work ----------------------------------------------------------------------------
def decide_sizes(tilers: dict, widths: np.ndarray, heights: np.ndarray) -> dict:
    """Every tiler's grid, crop count and degenerate flag for arrays of sizes (one shard)."""
    t0 = time.process_time()
    out = {}
    for name, tiler in tilers.items():
        if hasattr(tiler, "select_many"):
            m, n = tiler.select_many(widths, heights)
        else:  # a minimal third-party tiler: the scalar rule per size
            pairs = [tiler.select(int(a), int(b)) for a, b in zip(widths, heights)]
            m, n = [p[0] for p in pairs], [p[1] for p in pairs]
        m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
        try:
            crops = np.broadcast_to(np.asarray(tiler.num_crops(m, n), np.int64), m.shape)
        except (TypeError, ValueError):
            crops = np.array([tiler.num_crops(int(a), int(b)) for a, b in zip(m, n)], np.int64)
        degenerate = getattr(tiler, "degenerate_many", None)
        out[name] = {"m": m, "n": n, "crops": crops.copy(),
                     "degenerate": degenerate(widths, heights) if degenerate else np.zeros(len(m), bool)}
    out["_cpu_s"] = time.process_time() - t0
    return out


def decide(ctx, tilers: dict, widths: np.ndarray, heights: np.ndarray, shard_size: int):
    """Per-sample decisions, computed once per distinct size in Ray tasks over shards."""
    import ray

    import pandas as pd

    keys = (widths.astype(np.int64) << 32) | heights.astype(np.int64)
    inverse, unique = pd.factorize(keys)  # distinct sizes in first-seen order, O(N) hashing
    uw, uh = unique >> 32, unique & 0xFFFFFFFF
    shards = [(a, min(a + shard_size, len(unique))) for a in range(0, len(unique), shard_size)]
    parts, cpu_s = [None] * len(shards), 0.0
    if ray.is_initialized() and shards:
        task = ray.remote(num_cpus=1)(decide_sizes)
        tilers_ref = ray.put(tilers)
        pending = {task.remote(tilers_ref, uw[a:b], uh[a:b]): i for i, (a, b) in enumerate(shards)}
        with ctx.progress(total=len(shards), desc="tiling shards", unit="shard") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                parts[pending.pop(done[0])] = ray.get(done[0])
                bar.update(1)
    else:
        parts = [decide_sizes(tilers, uw[a:b], uh[a:b]) for a, b in shards]
    result = {}
    for name in tilers:
        result[name] = {k: (np.concatenate([p[name][k] for p in parts]) if parts else np.zeros(0, np.int64))[inverse]
                        for k in ("m", "n", "crops", "degenerate")}
    cpu_s = sum(p["_cpu_s"] for p in parts)
    return result, {"n_unique_sizes": int(len(unique)), "n_shards": len(shards), "select_cpu_s": round(cpu_s, 3)}


def decisions_table(samples, decided: dict, tokens_per_crop: int):
    import pandas as pd

    cols = {"width": samples["width"].to_numpy(np.int64), "height": samples["height"].to_numpy(np.int64)}
    for c in DECISION_EXTRA_COLUMNS:
        if c in samples.columns:
            cols[c] = samples[c].to_numpy()
    for name, d in decided.items():
        cols[f"{name}_m"], cols[f"{name}_n"] = d["m"].astype(np.int32), d["n"].astype(np.int32)
        cols[f"{name}_crops"] = d["crops"].astype(np.int32)
        cols[f"{name}_tokens"] = (d["crops"] * tokens_per_crop).astype(np.int64)
    return pd.DataFrame(cols)


def write_skipped(path: Path, skipped) -> None:
    cols = [c for c in ("row", "id", "image", "source", "width", "height", "reason", "detail") if c in skipped.columns]
    tmp = path.with_suffix(".csv.tmp")
    skipped[cols].to_csv(tmp, index=False)
    tmp.replace(path)


# -- the job ---------------------------------------------------------------------------------
def run(ctx) -> dict:
    from bluelm_v.jobs.ablate_tiling import report

    cfg, ab = ctx.cfg, ctx.cfg.ablation
    names = list(_plain(ab.tilers))
    params = {n: tiler_params(cfg, n) for n in names}
    tilers = {n: ctx.registry.tiler.create(n, _path=f"ablation.tilers.{n}", **params[n][0]) for n in names}
    timing, t0 = {}, time.perf_counter()
    samples, skipped, dataset = load_samples(ctx)
    write_skipped(ctx.path("skipped.csv"), skipped)
    timing["load_s"] = round(time.perf_counter() - t0, 3)

    t1 = time.perf_counter()
    decided, work = decide(ctx, tilers, samples["width"].to_numpy(np.int64),
                           samples["height"].to_numpy(np.int64), int(ab.shard_size))
    timing["decide_s"] = round(time.perf_counter() - t1, 3)
    decisions = decisions_table(samples, decided, int(ab.tokens_per_crop))
    decisions.to_parquet(ctx.path("decisions.parquet"), index=False)

    summary = report.summarize(decisions, tilers, params, ab.reference, decided, skipped, dataset,
                               int(ab.tokens_per_crop))
    summary["work"], summary["timing"] = work, timing
    t2 = time.perf_counter()
    report_path, images = report.write_report(ctx.run_dir, summary, decisions, tilers,
                                              plots=bool(ab.get("plots", True)),
                                              map_points=int(ab.get("map_points", 200)))
    timing["report_s"] = round(time.perf_counter() - t2, 3)
    summary = {"report": str(report_path), **summary}
    ctx.log_metrics(report.headline_metrics(summary))
    if images:
        ctx.log_images({name: str(p) for name, p in images.items()})
    print(f"bluelm-v: ablate_tiling report: {report_path}", flush=True)
    return summary
