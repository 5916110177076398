"""Tiling ablation: any set of tiling rules over any image sizes, in visual tokens, resolution kept and phone seconds.

    python -m bluelm_v.launch +experiment=ablate_tiling          # embedded COCO train2017 sizes (make run)
    python -m bluelm_v.launch +experiment=ablate_tiling tiler.alpha=0.2          # the relaxed tiler's alpha
    python -m bluelm_v.launch +experiment=ablate_tiling dataset.manifest=sizes.csv
    python -m bluelm_v.launch +experiment=ablate_tiling dataset.llava_json=llava_v1_5_mix665k.json \\
        dataset.image_root=playground/data
    python -m bluelm_v.launch +experiment=ablate_tiling 'ablation.tilers=[relaxed,qwen2_vl,minicpm_v,llava_onevision]'
    python -m bluelm_v.launch +experiment=ablate_tiling ablation.tilers=all       # every rule and preset
    python -m bluelm_v.launch +experiment=ablate_tiling 'ablation.overrides={internvl_448: {max_tiles: 6}}'

Inputs (docs/design.md §2.4): a size manifest (CSV with width,height; default: the real sizes of the
118,287 COCO train2017 images shipped in bluelm_v/data) or a LLaVA-format JSON whose image
sizes are read from file headers in parallel Ray tasks and cached (bluelm_v.data). Every row
that cannot be used is listed in skipped.csv with its reason; when every row is skipped the
job ends with status "failed" and says why.

Tilers (``ablation.tilers``, labels): a preset (conf/tiler/LABEL.yaml, e.g. ``llava_next_v16``,
``internvl_448``) or a registered tiler name (its factory's defaults), or ``all``. The top-level
``tiler`` node applies to the ablation's tiler of the same name (``tiler.alpha=0.2`` sets the
relaxed tiler's alpha); a ``tiler.*`` setting that matches no compared tiler is an error.
``ablation.overrides.LABEL`` goes on top of both. Sizes a rule's reference rejects are skipped
for that rule only, with the reason, and counted per tiler.

Work: the distinct (width, height) sizes are split into shards of ``ablation.shard_size``; one
Ray task per shard runs every tiler's vectorised ``decide_many``; answers are broadcast back to
the samples (per-sample counting: a size used by k samples counts k times). With
``pricing.enabled`` every decision is priced in encode + prefill seconds on ``pricing.backend``
(the simulated Dimensity 9300 by default; docs/design.md §5.10).

Outputs in the run directory: decisions.parquet (width, height, L_tokens for every tiler L,
L_m, L_n, L_crops where the rule has a grid, L_skip, L_encode_s / L_prefill_s when priced, + the
input's extra columns), skipped.csv (row, reason, detail, ...), report.md + PNG plots, and
summary.json (what run() returns: counts, per-tiler statistics, REF_vs_L comparisons).
"""
from __future__ import annotations

import time

import numpy as np

from bluelm_v.errors import ConfigError

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others): `tiler`
# applies to the compared tiler of the same name (tiler.alpha=0.2 sets relaxed's alpha).
USES = ("tiler",)

DECISION_EXTRA_COLUMNS = ("row", "line", "id", "image", "source")


# -- configuration ---------------------------------------------------------------------------
def _plain(node):
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(node, resolve=True)
    return node


def labels(cfg, registry) -> list[str]:
    from bluelm_v.plugins.tilers.zoo import all_labels

    value = _plain(cfg.ablation.get("tilers"))
    return all_labels(registry) if value == "all" else list(value or [])


def tiler_params(cfg, registry, label: str, path: str = "ablation.tilers") -> tuple[str, dict, str]:
    """(registered name, parameters, where they came from) for one tiler of the ablation."""
    from bluelm_v.plugins.tilers.zoo import resolve_label

    name, params, origin = resolve_label(label, registry, path)
    top = _plain(cfg.get("tiler"))
    if isinstance(top, dict) and top.get("name") == label == name:
        params = {k: v for k, v in top.items() if k != "name"}
        origin = "tiler (the top-level node)"
    extra = (_plain(cfg.ablation.get("overrides")) or {}).get(label)
    if extra:
        params = {**params, **extra}
        origin += f" + ablation.overrides.{label}"
    return name, params, origin


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate(cfg, registry) -> None:
    from bluelm_v.plugins.tilers.pricing import validate_pricing
    from bluelm_v.plugins.tilers.zoo import changed_settings

    ab, ds = cfg.get("ablation"), cfg.get("dataset")
    if ab is None or ds is None:
        raise ConfigError("ablation: the ablate_tiling job needs the `ablation` and `dataset` nodes "
                          "(conf/job/ablate_tiling.yaml)")
    raw = _plain(ab.get("tilers"))
    if raw != "all" and (not isinstance(raw, list) or not raw or not all(isinstance(n, str) for n in raw)):
        raise ConfigError(f"ablation.tilers: a non-empty list of tiler names / presets, or 'all'; got {raw!r}")
    names = labels(cfg, registry)
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation.tilers: names must be unique, got {names}")
    overrides = _plain(ab.get("overrides")) or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError(f"ablation.overrides: a mapping tiler name -> parameters, got {overrides!r}")
    stray = sorted(set(overrides) - set(names))
    if stray:
        raise ConfigError(f"ablation.overrides.{stray[0]}: not one of ablation.tilers {names}")
    for i, label in enumerate(names):
        name, params, origin = tiler_params(cfg, registry, label, f"ablation.tilers[{i}]")
        where = f"ablation.overrides.{label}" if label in overrides else ("tiler" if origin.startswith("tiler")
                                                                          else f"ablation.tilers[{i}]")
        registry.tiler.validate(name, params, where)
    top = cfg.get("tiler")
    if top is not None and registry.split_node(top, "tiler")[0] not in names:
        changed = changed_settings(top, registry)
        if changed:
            key, value = next(iter(changed.items()))
            raise ConfigError(f"tiler.{key}={value}: the ablate_tiling job compares ablation.tilers {names}, and none "
                              f"is tiler '{registry.split_node(top, 'tiler')[0]}'; add it to ablation.tilers or "
                              f"set ablation.overrides.LABEL.{key}")
    if ab.get("reference") not in names:
        raise ConfigError(f"ablation.reference: {ab.get('reference')!r} is not one of ablation.tilers {names}")
    for key in ("shard_size", "tokens_per_crop", "map_points"):
        if not _positive_int(ab.get(key)):
            raise ConfigError(f"ablation.{key}: a positive integer, got {ab.get(key)!r}")
    budgets = _plain(ab.get("token_budgets", [1024, 2048, 4096]))
    if not isinstance(budgets, list) or not all(_positive_int(b) for b in budgets):
        raise ConfigError(f"ablation.token_budgets: a list of positive integers, got {budgets!r}")
    validate_pricing(cfg.get("pricing"), registry)
    from bluelm_v.data.manifest import validate_dataset

    validate_dataset(ds)


# -- the decisions file ----------------------------------------------------------------------
def decisions_table(samples, decided: dict, tilers: dict, priced: dict):
    import pandas as pd

    cols = {"width": samples["width"].to_numpy(np.int64), "height": samples["height"].to_numpy(np.int64)}
    for c in DECISION_EXTRA_COLUMNS:
        if c in samples.columns:
            cols[c] = samples[c].to_numpy()
    for label, (d, _) in decided.items():
        if getattr(tilers[label], "has_grid", True):
            cols[f"{label}_m"], cols[f"{label}_n"] = d.m.astype(np.int32), d.n.astype(np.int32)
            cols[f"{label}_crops"] = d.crops.astype(np.int32)
        cols[f"{label}_tokens"] = pd.array(np.where(d.skipped, None, d.tokens), dtype="Int64")
        cols[f"{label}_skip"] = pd.Categorical.from_codes(d.skip_code.astype(np.int64), ["", *d.reasons])
        if label in priced:
            cols[f"{label}_encode_s"] = priced[label][0].astype(np.float32)
            cols[f"{label}_prefill_s"] = priced[label][1].astype(np.float32)
    return pd.DataFrame(cols)


def price_all(ctx, decided: dict) -> tuple[dict, dict]:
    """{label: (encode_s, prefill_s, n_below_floor)} and the pricer's description."""
    from bluelm_v.plugins.tilers.pricing import PhonePricer

    node = ctx.cfg.get("pricing")
    if node is None or not node.get("enabled", True):
        return {}, {}
    pricer = PhonePricer.from_config(node, ctx.registry)
    priced = {label: pricer.price(d.encoder_pixels, d.tokens) for label, (d, _) in decided.items()}
    return priced, {**pricer.describe(), "scale_to": int(node.get("scale_to", 624_610))}


# -- the job ---------------------------------------------------------------------------------
def run(ctx) -> dict:
    from bluelm_v.data.manifest import load_samples, write_skipped
    from bluelm_v.jobs.ablate_tiling import markdown, report
    from bluelm_v.plugins.tilers.zoo import decide_all

    cfg, ab = ctx.cfg, ctx.cfg.ablation
    names = labels(cfg, ctx.registry)
    params = {n: tiler_params(cfg, ctx.registry, n) for n in names}
    tilers = {n: ctx.registry.tiler.create(p[0], _path=f"ablation.tilers.{n}", **p[1]) for n, p in params.items()}
    timing, t0 = {}, time.perf_counter()
    samples, skipped, dataset = load_samples(cfg.dataset, ctx.run_dir, ctx.progress)
    write_skipped(ctx.path("skipped.csv"), skipped)
    timing["load_s"] = round(time.perf_counter() - t0, 3)
    if len(samples) == 0:
        reasons = skipped["reason"].value_counts().to_dict() if len(skipped) else {}
        why = (f"every one of the {len(skipped):,} input rows was skipped ("
               + ", ".join(f"{k}: {v:,}" for k, v in reasons.items()) + "); see skipped.csv") if len(skipped) \
            else "the input has no rows"
        print(f"bluelm-v: ablate_tiling: nothing to decide: {why}", flush=True)
        return {"status": "failed", "reason": why, "n_images": 0, "n_skipped": int(len(skipped)),
                "skipped_reasons": {str(k): int(v) for k, v in reasons.items()}, "dataset": dataset}

    t1 = time.perf_counter()
    widths, heights = samples["width"].to_numpy(np.int64), samples["height"].to_numpy(np.int64)
    decided, work = decide_all(tilers, widths, heights, int(ab.shard_size), ctx.progress, int(ab.tokens_per_crop))
    timing["decide_s"] = round(time.perf_counter() - t1, 3)
    t2 = time.perf_counter()
    priced, pricing = price_all(ctx, decided)
    timing["price_s"] = round(time.perf_counter() - t2, 3)
    decisions = decisions_table(samples, decided, tilers, priced)
    decisions.to_parquet(ctx.path("decisions.parquet"), index=False)

    budgets = tuple(int(b) for b in _plain(ab.get("token_budgets", [1024, 2048, 4096])))
    summary = report.summarize(decisions, tilers, params, ab.reference, decided, priced, pricing, skipped,
                               dataset, budgets)
    summary["work"], summary["timing"] = work, timing
    t3 = time.perf_counter()
    report_path, images = markdown.write_report(ctx.run_dir, summary, decisions, tilers,
                                              plots=bool(ab.get("plots", True)),
                                              map_points=int(ab.get("map_points", 200)))
    timing["report_s"] = round(time.perf_counter() - t3, 3)
    summary = {"report": str(report_path), **summary}
    ctx.log_metrics(report.headline_metrics(summary))
    if images:
        ctx.log_images({name: str(p) for name, p in images.items()})
    print(f"bluelm-v: ablate_tiling report: {report_path}", flush=True)
    return summary
