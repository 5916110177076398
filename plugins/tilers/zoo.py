"""Many tilers over many image sizes: decisions, per-rule statistics and the Pareto front
(used by the tiling jobs; docs/design.md §5.9).

    decided, work = decide_all({"relaxed": t1, "qwen2_vl": t2}, widths, heights, shard_size=50_000)
    stats = rule_stats(decided["qwen2_vl"], widths, heights, budgets=(1024, 2048, 4096))
    front = pareto_front(tokens, kept)       # bool per point: on the front (not dominated)

Work is done once per distinct (width, height) and broadcast back, in Ray tasks over shards
when Ray is initialised (in this process otherwise). A tiler without ``decide_many`` (a
minimal third-party one) is decided from ``select_many`` / ``select``, ``num_crops`` and
``tokens`` (else crops x ``default_tokens_per_crop``); its pixel columns are then unknown (NaN).
"""
from __future__ import annotations

import time

import numpy as np

from .base import Decisions


def decide_one(tiler, widths: np.ndarray, heights: np.ndarray, default_tokens_per_crop: int = 196) -> Decisions:
    """One tiler's decisions for arrays of (already distinct) sizes."""
    if hasattr(tiler, "decide_many"):
        return tiler.decide_many(widths, heights)
    if hasattr(tiler, "select_many"):
        m, n = tiler.select_many(widths, heights)
    else:
        pairs = [tiler.select(int(a), int(b)) for a, b in zip(widths, heights)]
        m, n = [p[0] for p in pairs], [p[1] for p in pairs]
    m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
    try:
        crops = np.broadcast_to(np.asarray(tiler.num_crops(m, n), np.int64), m.shape).copy()
    except (TypeError, ValueError):
        crops = np.array([tiler.num_crops(int(a), int(b)) for a, b in zip(m, n)], np.int64)
    if hasattr(tiler, "tokens"):
        tokens = np.asarray(tiler.tokens(widths, heights), np.int64)
    else:
        tokens = crops * int(getattr(tiler, "tokens_per_crop", default_tokens_per_crop))
    unknown = np.full(len(m), np.nan)
    return Decisions(m, n, crops, tokens, unknown, unknown.copy(), np.zeros(len(m), np.int8))


def decide_sizes(tilers: dict, widths: np.ndarray, heights: np.ndarray, default_tokens_per_crop: int = 196) -> dict:
    """Every tiler's decisions and degenerate flags for one shard of distinct sizes."""
    t0 = time.process_time()
    out = {}
    for name, tiler in tilers.items():
        d = decide_one(tiler, widths, heights, default_tokens_per_crop)
        degenerate = getattr(tiler, "degenerate_many", None)
        out[name] = (d, degenerate(widths, heights) if degenerate else np.zeros(len(d), bool))
    out["_cpu_s"] = time.process_time() - t0
    return out


def decide_all(tilers: dict, widths, heights, shard_size: int = 50_000, progress=None,
               default_tokens_per_crop: int = 196):
    """Per-sample decisions {name: (Decisions, degenerate)} and work figures."""
    import pandas as pd

    widths, heights = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    keys = (widths << 32) | heights
    inverse, unique = pd.factorize(keys)  # distinct sizes in first-seen order, O(N) hashing
    uw, uh = unique >> 32, unique & 0xFFFFFFFF
    shards = [(a, min(a + shard_size, len(unique))) for a in range(0, len(unique), shard_size)]
    parts = [None] * len(shards)
    try:
        import ray
        use_ray = ray.is_initialized() and len(shards) > 0
    except ImportError:
        use_ray = False
    if use_ray:
        task = ray.remote(num_cpus=1)(decide_sizes)
        ref = ray.put(tilers)
        pending = {task.remote(ref, uw[a:b], uh[a:b], default_tokens_per_crop): i for i, (a, b) in enumerate(shards)}
        bar = progress(total=len(shards), desc="tiling shards", unit="shard") if progress else None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            parts[pending.pop(done[0])] = ray.get(done[0])
            if bar:
                bar.update(1)
        if bar:
            bar.close()
    else:
        parts = [decide_sizes(tilers, uw[a:b], uh[a:b], default_tokens_per_crop) for a, b in shards]
    result = {}
    for name in tilers:
        d = Decisions.concat([p[name][0] for p in parts]).take(inverse)
        deg = (np.concatenate([p[name][1] for p in parts]) if parts else np.zeros(0, bool))[inverse]
        result[name] = (d, deg)
    work = {"n_unique_sizes": int(len(unique)), "n_shards": len(shards),
            "select_cpu_s": round(sum(p["_cpu_s"] for p in parts), 3)}
    return result, work


def scale_factors(d: Decisions, widths, heights) -> np.ndarray:
    """Content pixels at the encoder / image pixels, per sample (NaN where skipped or unknown)."""
    area = np.asarray(widths, np.float64) * np.asarray(heights, np.float64)
    out = d.pixels / area
    out[d.skipped] = np.nan
    return out


def rule_stats(d: Decisions, widths, heights, budgets=(1024, 2048, 4096)) -> dict:
    """Tokens, token budget shares, resolution kept and upscale of one rule over samples."""
    ok = ~d.skipped
    n_ok = int(ok.sum())
    tokens = d.tokens[ok]
    scale = scale_factors(d, widths, heights)[ok]
    known = np.isfinite(scale)
    codes = np.bincount(d.skip_code[~ok], minlength=len(d.reasons) + 1)[1:]
    reasons, counts = [r for r, c in zip(d.reasons, codes) if c], [c for c in codes if c]
    mean = (lambda x: float(x.mean()) if len(x) else None)
    return {
        "n_decided": n_ok, "n_skipped": int((~ok).sum()),
        "skip_reasons": {str(r): int(c) for r, c in zip(reasons, counts)},
        "mean_tokens": mean(tokens), "median_tokens": float(np.median(tokens)) if n_ok else None,
        "total_tokens": int(tokens.sum()), "max_tokens": int(tokens.max()) if n_ok else None,
        "share_over": {str(b): (float((tokens > b).mean()) if n_ok else None) for b in budgets},
        "mean_crops": mean(d.crops[ok]), "total_crops": int(d.crops[ok].sum()),
        "mean_kept": mean(np.minimum(scale[known], 1.0)),
        "mean_upscale": mean(scale[known]),
        "median_upscale": float(np.median(scale[known])) if known.any() else None,
        "share_upscaled": mean((scale[known] > 1).astype(np.float64)),
        "share_downscaled": mean((scale[known] < 1).astype(np.float64)),
    }


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """True for points no other point dominates (cost <= and value >= with one strict)."""
    cost, value = np.asarray(cost, np.float64), np.asarray(value, np.float64)
    le = cost[None, :] <= cost[:, None]
    ge = value[None, :] >= value[:, None]
    strict = (cost[None, :] < cost[:, None]) | (value[None, :] > value[:, None])
    dominated = (le & ge & strict).any(axis=1)
    return ~dominated


# -- which tiler a label means ----------------------------------------------------------------
def tiler_presets() -> dict:
    """{label: (registered name, parameters)} for every conf/tiler/LABEL.yaml."""
    from importlib import resources

    import yaml

    out = {}
    for item in sorted((resources.files("bluelm_v.conf") / "tiler").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".yaml"):
            data = yaml.safe_load(item.read_text()) or {}
            if isinstance(data, dict) and data.get("name"):
                out[item.name[:-5]] = (data["name"], {k: v for k, v in data.items() if k != "name"})
    return out


def all_labels(registry) -> list[str]:
    """Every registered tiler name and every preset label (what ``tilers: all`` means)."""
    return sorted(set(registry.tiler.names()) | set(tiler_presets()))


def resolve_label(label: str, registry, path: str) -> tuple[str, dict, str]:
    """(registered name, parameters, where they came from) for an ablation label: a preset
    (conf/tiler/LABEL.yaml) or a registered name (its factory's defaults)."""
    presets = tiler_presets()
    if label in presets:
        name, params = presets[label]
        return name, dict(params), f"conf/tiler/{label}.yaml"
    from bluelm_v.errors import UnknownComponentError

    try:
        registry.tiler.entry(label, path)
    except UnknownComponentError as exc:
        raise UnknownComponentError(f"{exc} Presets (conf/tiler): {', '.join(presets)}") from None
    return label, {}, "factory defaults"


def changed_settings(node, registry) -> dict:
    """The keys of a top-level ``tiler`` node whose values differ from that tiler's own
    defaults (its conf/tiler/NAME.yaml, else its factory's): what a user set on purpose."""
    name, params = registry.split_node(node, "tiler")
    base = tiler_presets().get(name, (name, None))[1]
    if base is None:
        base = {k: v for k, v in registry.tiler.describe(name)["parameters"].items()}
    return {k: v for k, v in params.items() if k not in base or base[k] != v}
