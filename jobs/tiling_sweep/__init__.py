"""Tiling sweep: each rule's parameters over a grid, visual tokens against resolution kept, the Pareto front.

    python -m bluelm_v.launch +experiment=tiling_sweep                    # embedded COCO train2017 sizes
    python -m bluelm_v.launch +experiment=tiling_sweep dataset.manifest=sizes.csv
    python -m bluelm_v.launch +experiment=tiling_sweep 'sweep.only=[relaxed,qwen2_vl]' 'sweep.grid.relaxed.params.alpha=[0,0.2,0.4]'
    python -m bluelm_v.launch +experiment=tiling_sweep '+sweep.grid.v16={tiler: llava_next_v16}'

Every entry of ``sweep.grid`` (label -> {tiler: a registered name or conf/tiler preset, params:
{key: [values]}}) is expanded to the cross product of its value lists; each setting is one
tiler; ``sweep.only`` (a list of grid labels) keeps those entries alone. All settings decide every sample (docs/design.md §5.9, the same Ray shards as the
ablation); per setting: mean visual tokens, the share of the image's pixels that reach the
encoder without being downscaled (mean of min(1, content pixels / image pixels)), the mean
upscale, the token-budget shares and, with ``pricing.enabled``, mean phone seconds. A setting
is dominated when another has no more mean tokens and no less resolution kept (one of them
strictly); the rest form the Pareto front (``pareto``; ``family_front``: the same within the
setting's own grid entry, for tuning one rule). The top-level ``tiler`` node plays no part: a
changed ``tiler.*`` setting is an error (sweep its values in sweep.grid instead).

Outputs: sweep.csv (one row per setting), pareto.png, report.md, summary.json.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from bluelm_v.errors import ConfigError

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others): none, the
# settings come from sweep.grid, whose labels and parameter lists the job checks itself.
USES = ()
OPEN_NODES = ("sweep.grid",)


def _plain(node):
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(node, resolve=True)
    return node


def settings(cfg, registry) -> list[dict]:
    """One dict per setting: label, family (the grid key), tiler name, params."""
    from bluelm_v.plugins.tilers.zoo import resolve_label

    grid_all = _plain(cfg.sweep.grid) or {}
    only = _plain(cfg.sweep.get("only"))
    if only is not None:
        if not isinstance(only, list) or not all(isinstance(o, str) for o in only):
            raise ConfigError(f"sweep.only: a list of sweep.grid labels, got {only!r}")
        unknown = [o for o in only if o not in grid_all]
        if unknown:
            raise ConfigError(f"sweep.only: {unknown[0]!r} is not a sweep.grid label; labels: {', '.join(grid_all)}")
        grid_all = {k: v for k, v in grid_all.items() if k in only}
    out = []
    for family, entry in grid_all.items():
        path = f"sweep.grid.{family}"
        if not isinstance(entry, dict) or set(entry) - {"tiler", "params"}:
            raise ConfigError(f"{path}: a mapping {{tiler: NAME, params: {{key: [values]}}}}, got {entry!r}")
        name, base, _ = resolve_label(entry.get("tiler") or family, registry, f"{path}.tiler")
        grid = entry.get("params") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"{path}.params: a mapping parameter -> list of values, got {grid!r}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}.params.{key}: a non-empty list of values, got {values!r}")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            params = {**base, **dict(zip(keys, combo))}
            label = family + ("[" + ",".join(f"{k}={v}" for k, v in zip(keys, combo)) + "]" if keys else "")
            out.append({"label": label, "family": family, "tiler": name, "params": params, "swept": dict(zip(keys, combo))})
    return out


def validate(cfg, registry) -> None:
    from bluelm_v.data.manifest import validate_dataset
    from bluelm_v.plugins.tilers.pricing import validate_pricing
    from bluelm_v.plugins.tilers.zoo import changed_settings

    if cfg.get("sweep") is None or cfg.get("dataset") is None:
        raise ConfigError("sweep: the tiling_sweep job needs the `sweep` and `dataset` nodes (conf/job/tiling_sweep.yaml)")
    found = settings(cfg, registry)
    if not found:
        raise ConfigError("sweep.grid: no settings to sweep; add an entry such as {relaxed: {params: {alpha: [0, 0.1]}}}")
    for s in found:
        registry.tiler.validate(s["tiler"], s["params"], f"sweep.grid.{s['family']}.params")
    if cfg.get("tiler") is not None:
        changed = changed_settings(cfg.tiler, registry)
        if changed:
            key, value = next(iter(changed.items()))
            raise ConfigError(f"tiler.{key}={value}: the tiling_sweep job sweeps sweep.grid and does not read the "
                              f"top-level tiler; put the values in sweep.grid.LABEL.params.{key}")
    for key in ("shard_size",):
        value = cfg.sweep.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"sweep.{key}: a positive integer, got {value!r}")
    budgets = _plain(cfg.sweep.get("token_budgets", [1024, 2048, 4096]))
    if not isinstance(budgets, list) or not all(isinstance(b, int) and b > 0 for b in budgets):
        raise ConfigError(f"sweep.token_budgets: a list of positive integers, got {budgets!r}")
    validate_pricing(cfg.get("pricing"), registry)
    validate_dataset(cfg.dataset)


def run(ctx) -> dict:
    from bluelm_v.data.manifest import load_samples, write_skipped
    from bluelm_v.jobs.tiling_sweep import report
    from bluelm_v.plugins.tilers.pricing import PhonePricer
    from bluelm_v.plugins.tilers.zoo import decide_all, pareto_front, rule_stats

    cfg = ctx.cfg
    found = settings(cfg, ctx.registry)
    tilers = {s["label"]: ctx.registry.tiler.create(s["tiler"], _path=f"sweep.grid.{s['family']}", **s["params"])
              for s in found}
    timing, t0 = {}, time.perf_counter()
    samples, skipped, dataset = load_samples(cfg.dataset, ctx.run_dir, ctx.progress)
    write_skipped(ctx.path("skipped.csv"), skipped)
    timing["load_s"] = round(time.perf_counter() - t0, 3)
    if len(samples) == 0:
        why = f"every one of the {len(skipped):,} input rows was skipped; see skipped.csv" if len(skipped) \
            else "the input has no rows"
        return {"status": "failed", "reason": why, "n_images": 0, "n_skipped": int(len(skipped)), "dataset": dataset}
    w, h = samples["width"].to_numpy(np.int64), samples["height"].to_numpy(np.int64)
    t1 = time.perf_counter()
    decided, work = decide_all(tilers, w, h, int(cfg.sweep.shard_size), ctx.progress)
    timing["decide_s"] = round(time.perf_counter() - t1, 3)
    budgets = tuple(int(b) for b in _plain(cfg.sweep.get("token_budgets", [1024, 2048, 4096])))
    node, pricer = cfg.get("pricing"), None
    if node is not None and node.get("enabled", True):
        pricer = PhonePricer.from_config(node, ctx.registry)
    rows = []
    for s in found:
        d = decided[s["label"]][0]
        st = rule_stats(d, w, h, budgets)
        row = {"label": s["label"], "family": s["family"], "tiler": s["tiler"], **s["swept"],
               "mean_tokens": st["mean_tokens"], "mean_kept": st["mean_kept"], "mean_upscale": st["mean_upscale"],
               "share_upscaled": st["share_upscaled"], "n_skipped": st["n_skipped"],
               **{f"share_over_{b}": st["share_over"][str(b)] for b in budgets}}
        if pricer is not None:
            enc, pre, _ = pricer.price(d.encoder_pixels, d.tokens)
            ok = np.isfinite(enc)
            row["mean_phone_s"] = float((enc[ok] + pre[ok]).mean()) if ok.any() else None
        rows.append(row)
    table = report.frame(rows)
    table["pareto"] = pareto_front(table["mean_tokens"].to_numpy(float), table["mean_kept"].to_numpy(float))
    table["family_front"] = False
    for _, part in table.groupby("family"):
        table.loc[part.index, "family_front"] = pareto_front(part["mean_tokens"].to_numpy(float),
                                                             part["mean_kept"].to_numpy(float))
    table.to_csv(ctx.path("sweep.csv"), index=False)
    summary = {"n_images": int(len(samples)), "n_skipped": int(len(skipped)), "n_settings": len(rows),
               "dataset": dataset, "token_budgets": list(budgets), "work": work, "timing": timing,
               "pricing": pricer.describe() if pricer else {},
               "front": table.loc[table["pareto"], "label"].tolist(), "settings": table.to_dict(orient="records")}
    t2 = time.perf_counter()
    path, images = report.write(ctx.run_dir, summary, table, plots=bool(cfg.sweep.get("plots", True)))
    timing["report_s"] = round(time.perf_counter() - t2, 3)
    if images:
        ctx.log_images({k: str(v) for k, v in images.items()})
    ctx.log_metrics({"tiling_sweep/n_settings": len(rows), "tiling_sweep/n_front": int(table["pareto"].sum())})
    print(f"bluelm-v: tiling_sweep report: {path}", flush=True)
    return {"report": str(path), **summary}
