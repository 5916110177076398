"""report.md of the tiling ablation: the tables a reader scans first, then the plots."""
from __future__ import annotations

from pathlib import Path

from bluelm_v.data.manifest import COCO_TRAIN2017_IMAGES, LLAVA665K_IMAGE_SAMPLES

from .report import PAPER, UPSCALE_NOTE, plot_grid_map, plot_tile_counts, plot_token_cdf


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def _source(ds) -> str:
    return {"embedded_coco2017_train": f"the embedded real sizes of the {COCO_TRAIN2017_IMAGES:,} COCO train2017 images",
            "manifest": f"size manifest `{ds.get('path')}`",
            "llava_json": f"LLaVA-format `{ds.get('path')}` (images under `{ds.get('image_root')}`)"}[ds["kind"]]


def _phone_lines(summary) -> list[str]:
    pricing, ref = summary["pricing"], summary["reference"]
    if not pricing:
        return []
    n = pricing["scale_to"]
    L = ["## Phone seconds", "",
         f"Each decision priced as encode + prefill on `{pricing['backend']}` ({pricing.get('profile')}), "
         f"{pricing['tiles_per_batch']} tiles per ViT call, prefill chunk {pricing['prefill_chunk']}, "
         f"{pricing['text_tokens']} text tokens, {pricing['run_cases']} run_case points interpolated "
         f"(docs/design.md §5.10; predicted, not measured).", "",
         f"| tiler | mean encode s | mean prefill s | mean s / image | phone-hours here | phone-hours per {n:,} images "
         f"| priced at the {pricing['prompt_floor_tokens']}-token floor |", "|---|---|---|---|---|---|---|"]
    for name, t in summary["tilers"].items():
        p = t["phone"]
        L.append(f"| `{name}` | {_fmt(p['mean_encode_s'])} | {_fmt(p['mean_prefill_s'])} | {_fmt(p['mean_s'])} | "
                 f"{_fmt(p['total_hours'], 1)} | {_fmt(p['scaled_hours'], 0)} | {p['n_below_floor']:,} |")
    L.append("")
    for pair, p in summary["pairs"].items():
        if "phone_hours_saved_scaled" in p:
            other = pair[len(ref) + 4:]
            more = p["phone_hours_saved_scaled"]
            L.append(f"- Over {n:,} images at this dataset's mean, `{other}` costs {abs(more):,.0f} phone-hours "
                     f"{'more' if more >= 0 else 'less'} than `{ref}`.")
    return L + [""]


def write_report(run_dir: Path, summary: dict, decisions, tilers: dict, plots: bool = True,
                 map_points: int = 200) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    ref, ds, names = summary["reference"], summary["dataset"], list(summary["tilers"])
    budgets = summary["token_budgets"]
    images, failed = {}, []
    if plots:
        jobs = {"token_cdf": lambda p: plot_token_cdf(p, decisions, names, budgets)}
        if any(t["has_grid"] for t in summary["tilers"].values()):
            jobs["tile_counts"] = lambda p: plot_tile_counts(p, summary)
            jobs["grid_map"] = lambda p: plot_grid_map(p, decisions, tilers, map_points)
        for key, draw in jobs.items():
            try:
                images[key] = draw(run_dir / f"{key}.png")
            except Exception as exc:  # noqa: BLE001 -- a plot must not lose the tables
                failed.append(f"{key}: {type(exc).__name__}: {exc}")
    L = [f"# Tiling ablation: {ref} vs {', '.join(n for n in names if n != ref)}", "",
         f"Data: {_source(ds)}. **{summary['n_images']:,} samples** decided, {summary['n_skipped']:,} input rows skipped"
         + (f" ({', '.join(f'{k}: {v:,}' for k, v in summary['skipped_reasons'].items())}; listed in `skipped.csv`)"
            if summary["n_skipped"] else "") + ".", ""]
    if ds["kind"] == "llava_json":
        L += [f"Header scan: {ds.get('n_unique_images', 0):,} distinct images, {ds.get('n_scanned', 0):,} scanned now, "
              f"{ds.get('n_from_cache', 0):,} from the cache `{ds.get('cache_file')}`; "
              f"{ds.get('n_over_pil_pixel_limit', 0):,} above PIL's decompression-bomb limit (measured from the header).", ""]
    over = " | ".join(f"> {b:,}" for b in budgets)
    L += ["## Tilers", "", f"| tiler | parameters (from) | mean crops | mean visual tokens | {over} | max tokens | "
          "resolution kept | mean / median upscale | upscaled | skipped (reasons) | degenerate |",
          "|---|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|---|"]
    for name, t in summary["tilers"].items():
        p = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "defaults"
        skips = ", ".join(f"{k}: {v:,}" for k, v in t["skip_reasons"].items())
        L.append(f"| `{name}` | `{t['tiler']}` {p} ({t['params_from']}) | {_fmt(t['mean_crops'], 2)} | "
                 f"{_fmt(t['mean_tokens'], 1)} | " + " | ".join(_pct(t["share_over"][str(b)]) for b in budgets)
                 + f" | {_fmt(t['max_tokens'])} | {_pct(t['mean_kept'])} | {_fmt(t['mean_upscale'], 2)} / "
                 f"{_fmt(t['median_upscale'], 2)} | {_pct(t['share_upscaled'])} | {t['n_skipped']:,}"
                 + (f" ({skips})" if skips else "") + f" | {t['n_degenerate']:,} |")
    L += ["", f"Visual tokens: what each rule's own model feeds its LLM (docs/design.md §5; the paper's three rules: "
          f"196 per crop, thumbnail included). > N: share of samples above N tokens. Upscale: {UPSCALE_NOTE}. "
          "Skipped: sizes the rule's reference rejects (not decided, excluded from that rule's figures). Degenerate: "
          "sizes no candidate canvas holds (anyres rules).", ""]
    L += _phone_lines(summary)
    grid_names = [n for n in names if summary["tilers"][n]["has_grid"]]
    if grid_names:
        counts = sorted({k for n in grid_names for k in summary["tilers"][n]["tile_count_histogram"]})
        L += ["## Tile-count histogram (samples)", "", "| tiles m*n | " + " | ".join(f"`{n}`" for n in grid_names) + " |",
              "|---|" + "---|" * len(grid_names)]
        for c in counts:
            L.append(f"| {c} | " + " | ".join(f"{summary['tilers'][n]['tile_count_histogram'].get(c, 0):,}"
                                               for n in grid_names) + " |")
        L.append("")
    L += [f"## `{ref}` against each tiler (per sample both decide)", "",
          "| pair | fewer tiles | same | more tiles | fewer tokens | same | more tokens | visual tokens saved |",
          "|---|---|---|---|---|---|---|---|"]
    for pair, p in summary["pairs"].items():
        tiles = (f"{p['smaller']:,} ({_pct(p['smaller_share'])}) | {p['same']:,} | {p['larger']:,} ({_pct(p['larger_share'])})"
                 if "smaller" in p else "- | - | -")
        L.append(f"| `{pair}` | {tiles} | {p['fewer_tokens']:,} | {p['same_tokens']:,} | {p['more_tokens']:,} | "
                 f"{p['visual_tokens_saved']:,} |")
    L += ["", f"fewer = `{ref}` needs fewer; visual tokens saved = the other tiler's total minus `{ref}`'s.", ""]
    L += ["## The paper's figures", "",
          f"BlueLM-V-3B reports, over the ~{LLAVA665K_IMAGE_SAMPLES:,} image samples of the whole LLaVA-1.5 665k mix: "
          "relaxed vs LLaVA-NeXT smaller in 29k samples, never larger; relaxed vs InternVL 1.5 smaller in 523k, larger in 25k."]
    est = summary.get("llava665k_coco_estimate")
    if est:
        L += ["", f"**The figures above are COCO-only**: {est['note']}. Not comparable one-to-one with the paper's "
              "numbers, which include the other sources' sizes (not available offline).", "",
              "| pair | COCO train2017 smaller / larger | scaled to 364,100 COCO samples | paper, whole mix |",
              "|---|---|---|---|"]
        for pair, p in summary["pairs"].items():
            if pair in est:
                paper = PAPER.get(pair)
                L.append(f"| `{pair}` | {p['smaller']:,} / {p['larger']:,} | {est[pair]['smaller']:,} / "
                         f"{est[pair]['larger']:,} | " + (f"{paper['smaller']:,} / {paper['larger']:,}" if paper else "-") + " |")
    if images or failed:
        titles = {"tile_counts": "Tile counts per tiler", "grid_map": "Chosen grid over (width, height)",
                  "token_cdf": "Visual tokens per sample (CDF)"}
        L += ["", "## Plots", ""] + [f"![{titles[k]}]({p.name})" for k, p in images.items()]
        L += [f"(plot failed: {f})" for f in failed]
    timing, work = summary.get("timing", {}), summary.get("work", {})
    L += ["", "## Files", "", "`decisions.parquet` (one row per sample: width, height, and per tiler L: L_tokens, "
          "L_skip, L_m / L_n / L_crops where the rule has a grid, L_encode_s / L_prefill_s when priced), "
          "`skipped.csv`, `summary.json`, this report.", "",
          f"Timing: load {timing.get('load_s', '-')} s, decide {timing.get('decide_s', '-')} s wall "
          f"({work.get('select_cpu_s', '-')} s CPU over {work.get('n_unique_sizes', 0):,} distinct sizes in "
          f"{work.get('n_shards', 0)} Ray task(s)), price {timing.get('price_s', '-')} s.", ""]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L))
    tmp.replace(path)
    return path, images
