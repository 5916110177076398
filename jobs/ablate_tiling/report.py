"""Statistics, tables and plots of the tiling ablation (used by jobs/ablate_tiling/)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bluelm_v.data.manifest import COCO_TRAIN2017_IMAGES, LLAVA665K_BY_SOURCE, LLAVA665K_IMAGE_SAMPLES

# The paper's counts over the ~624k image samples of LLaVA-1.5 665k (docs/design.md §2.4).
PAPER = {"relaxed_vs_llava_next": {"smaller": 29_000, "larger": 0},
         "relaxed_vs_internvl": {"smaller": 523_000, "larger": 25_000}}
UPSCALE_NOTE = ("image-content pixels in the local views at the encoder's input / image pixels (w*h), per sample "
                "(padding and thumbnail excluded); > 1 = the image is blown up, kept = min(1, that)")


def _share(count: int, total: int):
    return round(count / total, 6) if total else None


def _phone(priced, d, scale_to: int) -> dict | None:
    if priced is None:
        return None
    enc, pre, below = priced
    ok = ~d.skipped & np.isfinite(enc)
    total = enc[ok] + pre[ok]
    mean = float(total.mean()) if ok.any() else None
    return {"total_hours": float(total.sum() / 3600), "mean_s": mean,
            "mean_encode_s": float(enc[ok].mean()) if ok.any() else None,
            "mean_prefill_s": float(pre[ok].mean()) if ok.any() else None,
            "scaled_hours": mean * scale_to / 3600 if mean is not None else None, "n_below_floor": below}


def summarize(decisions, tilers, params, reference, decided, priced, pricing, skipped, dataset, budgets) -> dict:
    from bluelm_v.plugins.tilers.zoo import rule_stats

    n_images = len(decisions)
    w, h = decisions["width"].to_numpy(np.int64), decisions["height"].to_numpy(np.int64)
    reasons = skipped["reason"].value_counts().sort_index() if len(skipped) else {}
    scale_to = pricing.get("scale_to", LLAVA665K_IMAGE_SAMPLES)
    out = {"n_images": n_images, "n_skipped": int(len(skipped)),
           "skipped_reasons": {str(k): int(v) for k, v in dict(reasons).items()},
           "reference": reference, "token_budgets": list(budgets), "dataset": dataset, "pricing": pricing,
           "tilers": {}, "pairs": {}}
    for label, tiler in tilers.items():
        d, degenerate = decided[label]
        entry = {"tiler": params[label][0], "params": params[label][1], "params_from": params[label][2],
                 "has_grid": bool(getattr(tiler, "has_grid", True)), **rule_stats(d, w, h, budgets),
                 "n_degenerate": int(degenerate.sum()), "phone": _phone(priced.get(label), d, scale_to)}
        if entry["has_grid"]:
            ok = ~d.skipped
            tiles = (d.m * d.n)[ok]
            grids, counts = np.unique(d.m[ok] * 10_000 + d.n[ok], return_counts=True)
            entry["mean_tiles"] = float(tiles.mean()) if len(tiles) else None
            entry["tile_count_histogram"] = {int(k): int(v) for k, v in enumerate(np.bincount(tiles)) if v}
            entry["grid_histogram"] = {f"{g // 10_000}:{g % 10_000}": int(c) for g, c in zip(grids, counts)}
        out["tilers"][label] = entry
    ref_d = decided[reference][0]
    for label in tilers:
        if label == reference:
            continue
        d = decided[label][0]
        both = ~ref_d.skipped & ~d.skipped
        n_both = int(both.sum())
        pair = {"n_compared": n_both}
        if out["tilers"][label]["has_grid"] and out["tilers"][reference]["has_grid"]:
            diff = (ref_d.m * ref_d.n - d.m * d.n)[both]
            pair.update({"smaller": int((diff < 0).sum()), "same": int((diff == 0).sum()), "larger": int((diff > 0).sum())})
            pair.update({f"{k}_share": _share(pair[k], n_both) for k in ("smaller", "same", "larger")})
        tok = (ref_d.tokens - d.tokens)[both]
        pair.update({"fewer_tokens": int((tok < 0).sum()), "same_tokens": int((tok == 0).sum()),
                     "more_tokens": int((tok > 0).sum()), "visual_tokens_saved": int(-tok.sum())})
        if label in priced and reference in priced:
            cost = lambda p: (p[0] + p[1])[both]  # noqa: E731
            saved = float((cost(priced[label]) - cost(priced[reference])).sum())
            pair["phone_hours_saved"] = saved / 3600
            pair["phone_hours_saved_scaled"] = saved / max(n_both, 1) * scale_to / 3600
        out["pairs"][f"{reference}_vs_{label}"] = pair
    out["notes"] = {"upscale": UPSCALE_NOTE,
                    "pairs": f"{reference}_vs_L: 'smaller' = samples where {reference} picks fewer tiles (m*n) than "
                             f"L, 'fewer_tokens' = fewer visual tokens; counted per sample both rules decide"}
    if dataset.get("kind") == "embedded_coco2017_train":
        scale = LLAVA665K_BY_SOURCE["coco"] / COCO_TRAIN2017_IMAGES
        out["llava665k_coco_estimate"] = {
            "note": (f"COCO train2017 only: each of the {COCO_TRAIN2017_IMAGES:,} images counted once. Scaled by "
                     f"{LLAVA665K_BY_SOURCE['coco']:,}/{COCO_TRAIN2017_IMAGES:,} = {scale:.4f} (assumes every COCO "
                     f"image is used equally often) to estimate the COCO part of the 665k mix; the paper's "
                     f"figures cover all {LLAVA665K_IMAGE_SAMPLES:,} image samples (vg, ocr_vqa, gqa, textvqa too)"),
            **{pair: {k: int(round(v[k] * scale)) for k in ("smaller", "same", "larger")}
               for pair, v in out["pairs"].items() if "smaller" in v}}
    return out


def headline_metrics(summary: dict) -> dict:
    flat = {"ablate_tiling/n_images": summary["n_images"], "ablate_tiling/n_skipped": summary["n_skipped"]}
    for name, t in summary["tilers"].items():
        for key in ("mean_crops", "total_tokens", "mean_tokens", "mean_upscale", "mean_kept", "n_skipped"):
            if t.get(key) is not None:
                flat[f"ablate_tiling/{name}/{key}"] = t[key]
        if t.get("phone"):
            flat[f"ablate_tiling/{name}/phone_hours"] = t["phone"]["total_hours"]
    for pair, p in summary["pairs"].items():
        for key in ("smaller", "same", "larger", "fewer_tokens", "more_tokens", "phone_hours_saved"):
            if p.get(key) is not None:
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
    names = [n for n, t in summary["tilers"].items() if t["has_grid"]]
    counts = sorted({k for n in names for k in summary["tilers"][n]["tile_count_histogram"]})
    fig, ax = plt.subplots(figsize=(min(18, max(6, 0.5 * len(counts) * len(names))), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        hist = summary["tilers"][name]["tile_count_histogram"]
        ax.bar(np.arange(len(counts)) + i * width, [hist.get(k, 0) for k in counts], width, label=name)
    ax.set_xticks(np.arange(len(counts)) + width * (len(names) - 1) / 2, [str(c) for c in counts])
    ax.set_xlabel("tiles per image (m*n)")
    ax.set_ylabel("samples")
    ax.set_title(f"Tile counts over {summary['n_images']:,} samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grid_map(path: Path, decisions, tilers: dict, points: int) -> Path:
    """Each grid rule's chosen grid over a (width, height) lattice, with the data's sizes on top."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    from bluelm_v.plugins.tilers.zoo import decide_one

    w, h = decisions["width"].to_numpy(), decisions["height"].to_numpy()
    top = max(np.quantile(np.maximum(w, h), 0.999) * 1.25, 2 * 384) if len(w) else 1536
    axis = np.unique(np.linspace(1, top, points).round().astype(np.int64))
    gw, gh = np.meshgrid(axis, axis)
    maps = {}
    for name, tiler in tilers.items():
        if getattr(tiler, "has_grid", True):
            d = decide_one(tiler, gw.ravel(), gh.ravel())
            maps[name] = (d.m * 10_000 + d.n).reshape(gw.shape)
    grids = sorted(set(np.unique(np.concatenate([v.ravel() for v in maps.values()])).tolist()),
                   key=lambda g: ((g // 10_000) * (g % 10_000), g))
    colours = [plt.get_cmap("tab20")(i % 20) if i < 20 else plt.get_cmap("tab20b")(i % 20) for i in range(len(grids))]
    index = {g: i for i, g in enumerate(grids)}
    sizes = np.unique(np.stack([w, h], 1), axis=0) if len(w) else np.zeros((0, 2))
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.8, 4.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(maps):]:
        ax.axis("off")
    for ax, (name, grid) in zip(axes.ravel(), maps.items()):
        ids = np.vectorize(index.get)(grid)
        ax.imshow(ids, origin="lower", extent=(axis[0], axis[-1], axis[0], axis[-1]), aspect="auto",
                  cmap=ListedColormap(colours), vmin=-0.5, vmax=len(grids) - 0.5, interpolation="nearest")
        ax.scatter(sizes[:, 0], sizes[:, 1], s=1, c="k", alpha=0.35, linewidths=0)
        ax.set_title(name)
        ax.set_xlabel("width (px)")
        ax.set_ylabel("height (px)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in range(len(grids))]
    right = 1 - 1.8 / fig.get_figwidth()
    fig.suptitle("Chosen grid over (width, height); dots = the data's distinct sizes")
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.legend(handles, [f"{g // 10_000}:{g % 10_000}" for g in grids], loc="center left", title="grid m:n",
               bbox_to_anchor=(right, 0.5), fontsize=6, ncols=1 if len(grids) <= 24 else 2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_token_cdf(path: Path, decisions, names, budgets) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        col = decisions[f"{name}_tokens"].dropna().to_numpy(np.int64)
        values, counts = np.unique(col, return_counts=True)
        if len(values):
            ax.step(np.concatenate([[0], values]), np.concatenate([[0], np.cumsum(counts) / counts.sum()]),
                    where="post", label=name)
    for b in budgets:
        ax.axvline(b, color="grey", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlabel("visual tokens per sample (each rule's own model)")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Visual-token CDF (dotted: token budgets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
