"""The Pareto plot and report.md of the tiling sweep (used by jobs/tiling_sweep/)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows).sort_values(["mean_tokens", "mean_kept"], ascending=[True, False]).reset_index(drop=True)


def plot_pareto(path: Path, table) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    families = list(dict.fromkeys(table["family"]))
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    for i, fam in enumerate(families):
        part = table[table["family"] == fam]
        front = part["pareto"].to_numpy(bool)
        colour = cmap(i % cmap.N)
        ax.scatter(part["mean_tokens"][front], 100 * part["mean_kept"][front], s=36, color=colour, label=fam, zorder=3)
        ax.scatter(part["mean_tokens"][~front], 100 * part["mean_kept"][~front], s=24, facecolors="none",
                   edgecolors=[colour], zorder=2)
        ax.plot(part["mean_tokens"], 100 * part["mean_kept"], color=colour, lw=0.6, alpha=0.5)
    front = table[table["pareto"]].sort_values("mean_tokens")
    ax.step(front["mean_tokens"], 100 * front["mean_kept"], where="post", color="k", lw=1.2, label="Pareto front")
    for _, r in front.iterrows():
        ax.annotate(r["label"], (r["mean_tokens"], 100 * r["mean_kept"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("mean visual tokens per image (log)")
    ax.set_ylabel("resolution kept: image pixels reaching the encoder undownscaled (%)")
    ax.set_title("Tiling settings: tokens vs resolution kept (filled: on the front, hollow: dominated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:,.{digits}f}"


def write(run_dir: Path, summary: dict, table, plots: bool = True) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    images, failed = {}, []
    if plots:
        try:
            images["pareto"] = plot_pareto(run_dir / "pareto.png", table)
        except Exception as exc:  # noqa: BLE001 -- a plot must not lose the table
            failed.append(f"pareto: {type(exc).__name__}: {exc}")
    budgets = summary["token_budgets"]
    priced = "mean_phone_s" in table.columns
    L = ["# Tiling sweep: visual tokens vs resolution kept", "",
         f"{summary['n_images']:,} samples ({summary['dataset'].get('kind')}: `{summary['dataset'].get('path')}`), "
         f"{summary['n_skipped']:,} input rows skipped; {summary['n_settings']} settings, "
         f"{len(summary['front'])} on the Pareto front (fewest mean tokens for the resolution kept).", ""]
    L += [f"![Pareto front]({p.name})" for p in images.values()] + [f"(plot failed: {f})" for f in failed] + [""]
    head = ("| setting | mean tokens | resolution kept | mean upscale | "
            + " | ".join(f"> {b:,}" for b in budgets) + (" | mean phone s" if priced else "") + " | skipped | front | within its rule |")
    L += ["## Settings (by mean tokens)", "", head, "|---" * (head.count("|") - 1) + "|"]
    for _, r in table.iterrows():
        L.append(f"| `{r['label']}` | {_f(r['mean_tokens'])} | {_f(100 * r['mean_kept'] if r['mean_kept'] is not None else None)}% | "
                 f"{_f(r['mean_upscale'], 2)} | " + " | ".join(_f(100 * r[f'share_over_{b}']) + "%" for b in budgets)
                 + (f" | {_f(r['mean_phone_s'], 3)}" if priced else "") + f" | {int(r['n_skipped']):,} | "
                 + ("**front**" if r["pareto"] else "dominated") + " | "
                 + ("front" if r["family_front"] else "dominated") + " |")
    L += ["", "Resolution kept: the mean over samples of min(1, image-content pixels in the local views at the encoder / "
          "image pixels); mean upscale: the mean of that ratio without the cap. A setting is dominated when another "
          "needs no more mean tokens and keeps no less resolution (one strictly); 'within its rule' compares "
          "the settings of one grid entry only. Skipped: sizes the rule's reference "
          "rejects, left out of that setting's means." + (" Phone seconds: encode + prefill on the simulated phone "
                                                           "(docs/design.md §5.10; predicted)." if priced else ""), "",
          "Files: `sweep.csv` (this table), `skipped.csv`, `summary.json`.", ""]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L))
    tmp.replace(path)
    return path, images
