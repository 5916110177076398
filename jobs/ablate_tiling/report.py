"""Statistics, tables and plots of the tiling ablation (used by jobs/ablate_tiling/)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bluelm_v.data.manifest import COCO_TRAIN2017_IMAGES, LLAVA665K_BY_SOURCE, LLAVA665K_IMAGE_SAMPLES

# The paper's counts over the ~624k image samples of LLaVA-1.5 665k (docs/design.md §2.4).
PAPER = {"relaxed_vs_llava_next": {"smaller": 29_000, "larger": 0},
         "relaxed_vs_internvl": {"smaller": 523_000, "larger": 25_000}}
UPSCALE_NOTE = "canvas pixels of the local tiles (m*n*B^2) / image pixels (w*h); >1 = the image is blown up"


def _share(count: int, total: int):
    return round(count / total, 6) if total else None


def summarize(decisions, tilers, params, reference, decided, skipped, dataset, tokens_per_crop) -> dict:
    n_images = len(decisions)
    reasons = skipped["reason"].value_counts().sort_index() if len(skipped) else {}
    area = decisions["width"].to_numpy(np.float64) * decisions["height"].to_numpy(np.float64)
    out = {"n_images": n_images, "n_skipped": int(len(skipped)),
           "skipped_reasons": {str(k): int(v) for k, v in dict(reasons).items()},
           "reference": reference, "tokens_per_crop": tokens_per_crop, "dataset": dataset,
           "tilers": {}, "pairs": {}}
    tiles = {}
    for name, tiler in tilers.items():
        m, n = decisions[f"{name}_m"].to_numpy(np.int64), decisions[f"{name}_n"].to_numpy(np.int64)
        tiles[name] = m * n
        crops, tokens = decisions[f"{name}_crops"].to_numpy(np.int64), decisions[f"{name}_tokens"].to_numpy(np.int64)
        counts = np.bincount(tiles[name]) if n_images else np.zeros(0, np.int64)
        grids, grid_counts = np.unique(m * 10_000 + n, return_counts=True)
        B = getattr(tiler, "tile_size", None)
        upscale = (B * B * tiles[name]) / area if B and n_images else None
        out["tilers"][name] = {
            "params": params[name][0], "params_from": params[name][1],
            "tile_count_histogram": {int(k): int(v) for k, v in enumerate(counts) if v},
            "grid_histogram": {f"{g // 10_000}:{g % 10_000}": int(c) for g, c in zip(grids, grid_counts)},
            "mean_tiles": float(tiles[name].mean()) if n_images else None,
            "mean_crops": float(crops.mean()) if n_images else None,
            "total_crops": int(crops.sum()),
            "total_visual_tokens": int(tokens.sum()),
            "mean_visual_tokens": float(tokens.mean()) if n_images else None,
            "mean_upscale_factor": float(upscale.mean()) if upscale is not None else None,
            "median_upscale_factor": float(np.median(upscale)) if upscale is not None else None,
            "share_upscaled": _share(int((upscale > 1).sum()), n_images) if upscale is not None else None,
            "n_degenerate": int(decided[name]["degenerate"].sum()),
        }
    for name in tilers:
        if name == reference:
            continue
        diff = tiles[reference] - tiles[name]
        smaller, same, larger = int((diff < 0).sum()), int((diff == 0).sum()), int((diff > 0).sum())
        ref_tok, t_tok = out["tilers"][reference]["total_visual_tokens"], out["tilers"][name]["total_visual_tokens"]
        out["pairs"][f"{reference}_vs_{name}"] = {
            "smaller": smaller, "same": same, "larger": larger,
            "smaller_share": _share(smaller, n_images), "same_share": _share(same, n_images),
            "larger_share": _share(larger, n_images),
            "visual_tokens_saved": t_tok - ref_tok,  # > 0: the reference needs fewer tokens
        }
    out["notes"] = {"upscale_factor": UPSCALE_NOTE,
                    "pairs": f"{reference}_vs_T: 'smaller' = samples where {reference} picks fewer tiles (m*n) "
                             f"than T, 'larger' = more; counted per sample"}
    if dataset.get("kind") == "embedded_coco2017_train":
        scale = LLAVA665K_BY_SOURCE["coco"] / COCO_TRAIN2017_IMAGES
        out["llava665k_coco_estimate"] = {
            "note": (f"COCO train2017 only: each of the {COCO_TRAIN2017_IMAGES:,} images counted once. Scaled by "
                     f"{LLAVA665K_BY_SOURCE['coco']:,}/{COCO_TRAIN2017_IMAGES:,} = {scale:.4f} (assumes every COCO "
                     f"image is used equally often) to estimate the COCO part of the 665k mix; the paper's "
                     f"figures cover all {LLAVA665K_IMAGE_SAMPLES:,} image samples (vg, ocr_vqa, gqa, textvqa too)"),
            **{pair: {k: int(round(v[k] * scale)) for k in ("smaller", "same", "larger")}
               for pair, v in out["pairs"].items()}}
    return out


def headline_metrics(summary: dict) -> dict:
    flat = {"ablate_tiling/n_images": summary["n_images"], "ablate_tiling/n_skipped": summary["n_skipped"]}
    for name, t in summary["tilers"].items():
        for key in ("mean_crops", "total_visual_tokens", "mean_upscale_factor"):
            if t[key] is not None:
                flat[f"ablate_tiling/{name}/{key}"] = t[key]
    for pair, p in summary["pairs"].items():
        for key in ("smaller", "same", "larger", "smaller_share", "larger_share"):
            if p[key] is not None:
                flat[f"ablate_tiling/{pair}/{key}"] = p[key]
    return flat


# -- plots -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_tile_counts(path: Path, summary: dict) -> Path:
    plt = _pyplot()
    names = list(summary["tilers"])
    counts = sorted({k for t in summary["tilers"].values() for k in t["tile_count_histogram"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(counts) * len(names)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        hist = summary["tilers"][name]["tile_count_histogram"]
        ax.bar(np.arange(len(counts)) + i * width, [hist.get(k, 0) for k in counts], width, label=name)
    ax.set_xticks(np.arange(len(counts)) + width * (len(names) - 1) / 2, [str(c) for c in counts])
    ax.set_xlabel("tiles per image (m*n)")
    ax.set_ylabel("samples")
    ax.set_title(f"Tile counts over {summary['n_images']:,} samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grid_map(path: Path, decisions, tilers: dict, points: int) -> Path:
    """Each tiler's chosen grid over a (width, height) lattice, with the data's sizes on top."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    w, h = decisions["width"].to_numpy(), decisions["height"].to_numpy()
    top = max(np.quantile(np.maximum(w, h), 0.999) * 1.25, 2 * 384) if len(w) else 1536
    axis = np.unique(np.linspace(1, top, points).round().astype(np.int64))
    gw, gh = np.meshgrid(axis, axis)
    maps = {}
    for name, tiler in tilers.items():
        if hasattr(tiler, "select_many"):
            m, n = (np.asarray(a, np.int64) for a in tiler.select_many(gw.ravel(), gh.ravel()))
        else:
            pairs = np.array([tiler.select(int(a), int(b)) for a, b in zip(gw.ravel(), gh.ravel())], np.int64)
            m, n = pairs[:, 0], pairs[:, 1]
        maps[name] = (m * 10_000 + n).reshape(gw.shape)
    grids = sorted(set(np.unique(np.concatenate([v.ravel() for v in maps.values()])).tolist()),
                   key=lambda g: ((g // 10_000) * (g % 10_000), g))
    colours = [plt.get_cmap("tab20")(i % 20) if i < 20 else plt.get_cmap("tab20b")(i % 20) for i in range(len(grids))]
    index = {g: i for i, g in enumerate(grids)}
    sizes = np.unique(np.stack([w, h], 1), axis=0) if len(w) else np.zeros((0, 2))
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps) + 1.5, 4.4), squeeze=False)
    for ax, (name, grid) in zip(axes[0], maps.items()):
        ids = np.vectorize(index.get)(grid)
        ax.imshow(ids, origin="lower", extent=(axis[0], axis[-1], axis[0], axis[-1]), aspect="auto",
                  cmap=ListedColormap(colours), vmin=-0.5, vmax=len(grids) - 0.5, interpolation="nearest")
        ax.scatter(sizes[:, 0], sizes[:, 1], s=1, c="k", alpha=0.35, linewidths=0)
        ax.set_title(name)
        ax.set_xlabel("width (px)")
    axes[0][0].set_ylabel("height (px)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in range(len(grids))]
    right = 1 - (1.0 if len(grids) <= 16 else 1.8) / fig.get_figwidth()
    fig.suptitle("Chosen grid over (width, height); dots = the data's distinct sizes")
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.legend(handles, [f"{g // 10_000}:{g % 10_000}" for g in grids], loc="center left", title="grid m:n",
               bbox_to_anchor=(right, 0.5), fontsize=7, ncols=1 if len(grids) <= 16 else 2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_token_cdf(path: Path, decisions, names) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        values, counts = np.unique(decisions[f"{name}_tokens"].to_numpy(), return_counts=True)
        if len(values):
            ax.step(np.concatenate([[0], values]), np.concatenate([[0], np.cumsum(counts) / counts.sum()]),
                    where="post", label=name)
    ax.set_xlabel("visual tokens per sample (196 per crop)")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Visual-token CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the markdown report ---------------------------------------------------------------------
def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def write_report(run_dir: Path, summary: dict, decisions, tilers: dict, plots: bool = True,
                 map_points: int = 200) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    ref, ds, names = summary["reference"], summary["dataset"], list(summary["tilers"])
    images, failed = {}, []
    if plots:
        jobs = {"tile_counts": lambda p: plot_tile_counts(p, summary),
                "grid_map": lambda p: plot_grid_map(p, decisions, tilers, map_points),
                "token_cdf": lambda p: plot_token_cdf(p, decisions, names)}
        for key, draw in jobs.items():
            try:
                images[key] = draw(run_dir / f"{key}.png")
            except Exception as exc:  # noqa: BLE001 -- a plot must not lose the tables
                failed.append(f"{key}: {type(exc).__name__}: {exc}")
    source = {"embedded_coco2017_train": f"the embedded real sizes of the {COCO_TRAIN2017_IMAGES:,} COCO train2017 images",
              "manifest": f"size manifest `{ds.get('path')}`",
              "llava_json": f"LLaVA-format `{ds.get('path')}` (images under `{ds.get('image_root')}`)"}[ds["kind"]]
    L = [f"# Tiling ablation: {ref} vs {', '.join(n for n in names if n != ref)}", "",
         f"Data: {source}. **{summary['n_images']:,} samples** decided, {summary['n_skipped']:,} skipped"
         + (f" ({', '.join(f'{k}: {v:,}' for k, v in summary['skipped_reasons'].items())}; listed in `skipped.csv`)"
            if summary["n_skipped"] else "") + ".", ""]
    if ds["kind"] == "llava_json":
        L += [f"Header scan: {ds.get('n_unique_images', 0):,} distinct images, {ds.get('n_scanned', 0):,} scanned now, "
              f"{ds.get('n_from_cache', 0):,} from the cache `{ds.get('cache_file')}`; "
              f"{ds.get('n_over_pil_pixel_limit', 0):,} above PIL's decompression-bomb limit (measured from the header).", ""]
    L += ["## Tilers", "", "| tiler | parameters (from) | mean tiles | mean crops | mean visual tokens | "
          "total visual tokens | mean / median upscale | upscaled | degenerate |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in summary["tilers"].items():
        p = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "defaults"
        L.append(f"| `{name}` | {p} ({t['params_from']}) | {_fmt(t['mean_tiles'])} | {_fmt(t['mean_crops'])} | "
                 f"{_fmt(t['mean_visual_tokens'], 1)} | {_fmt(t['total_visual_tokens'])} | "
                 f"{_fmt(t['mean_upscale_factor'], 2)} / {_fmt(t['median_upscale_factor'], 2)} | "
                 f"{_pct(t['share_upscaled'])} | {t['n_degenerate']:,} |")
    L += ["", f"Upscale factor: {UPSCALE_NOTE}. Visual tokens: {summary['tokens_per_crop']} per crop "
          "(thumbnail included). Degenerate: sizes no candidate canvas can hold (see plugins/tilers.py).", ""]
    counts = sorted({k for t in summary["tilers"].values() for k in t["tile_count_histogram"]})
    L += ["## Tile-count histogram (samples)", "", "| tiles m*n | " + " | ".join(f"`{n}`" for n in names) + " |",
          "|---|" + "---|" * len(names)]
    for c in counts:
        L.append(f"| {c} | " + " | ".join(f"{summary['tilers'][n]['tile_count_histogram'].get(c, 0):,}" for n in names) + " |")
    L += ["", f"## `{ref}` against each tiler (per sample, by tile count m*n)", "",
          "| pair | smaller | same | larger | smaller | same | larger | visual tokens saved |", "|---|---|---|---|---|---|---|---|"]
    for pair, p in summary["pairs"].items():
        L.append(f"| `{pair}` | {p['smaller']:,} | {p['same']:,} | {p['larger']:,} | {_pct(p['smaller_share'])} | "
                 f"{_pct(p['same_share'])} | {_pct(p['larger_share'])} | {p['visual_tokens_saved']:,} |")
    L += ["", f"smaller = `{ref}` picks fewer tiles than the other tiler; visual tokens saved = the other "
          f"tiler's total minus `{ref}`'s.", ""]
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
            paper = PAPER.get(pair)
            L.append(f"| `{pair}` | {p['smaller']:,} / {p['larger']:,} | {est[pair]['smaller']:,} / {est[pair]['larger']:,} | "
                     + (f"{paper['smaller']:,} / {paper['larger']:,}" if paper else "-") + " |")
    if images or failed:
        L += ["", "## Plots", ""]
        titles = {"tile_counts": "Tile counts per tiler", "grid_map": "Chosen grid over (width, height)",
                  "token_cdf": "Visual tokens per sample (CDF)"}
        L += [f"![{titles[k]}]({p.name})" for k, p in images.items()]
        L += [f"(plot failed: {f})" for f in failed]
    timing = summary.get("timing", {})
    L += ["", "## Files", "", "`decisions.parquet` (one row per sample: width, height, "
          + ", ".join(f"{n}_m/_n/_crops/_tokens" for n in names) + "), `skipped.csv`, `summary.json`, this report.",
          "", f"Timing: load {timing.get('load_s', '-')} s, decide {timing.get('decide_s', '-')} s wall "
          f"({summary.get('work', {}).get('select_cpu_s', '-')} s CPU over {summary.get('work', {}).get('n_unique_sizes', 0):,} "
          f"distinct sizes in {summary.get('work', {}).get('n_shards', 0)} Ray task(s)).", ""]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L))
    tmp.replace(path)
    return path, images
