"""The tiler ablation's table (one row per tiler), report.md and accuracy_vs_tokens.png."""
from __future__ import annotations

from pathlib import Path


def _category(evaluation: dict, name: str) -> dict:
    block = (evaluation.get("by_category") or {}).get(name) or {}
    return {"score": block.get("score"), "ci95": block.get("ci95"), "n": block.get("n", 0)}


def table(rows: list[dict]) -> list[dict]:
    """Per tiler: reading and coarse accuracy with 95% intervals, mean visual tokens per
    sample, stage-2 training tokens/s, phone seconds per image."""
    out = []
    for row in rows:
        ev, tr = row["evaluate"], row["train"]
        out.append({"tiler": row["tiler"], "reading": _category(ev, "reading"), "coarse": _category(ev, "coarse"),
                    "overall": {"score": ev.get("score"), "ci95": ev.get("score_ci95"), "n": ev.get("n_scored")},
                    "mean_visual_tokens": ev.get("mean_visual_tokens"),
                    "train_tokens_per_s": (tr.get("tokens_per_s") or {}).get("stage2"),
                    "train_wall_s": tr.get("wall_s"), "stage2_final_loss": (tr.get("stage2") or {}).get("final_loss"),
                    "phone_s_per_image": row["phone"]["seconds_per_image"], "phone": row["phone"],
                    "skipped": ev.get("skipped"), "train_skipped": ((tr.get("stage2") or {}).get("data") or {}).get("skipped"),
                    "checkpoint": (tr.get("checkpoint") or {}).get("path"), "evaluation": ev.get("report")})
    return out


def _pct(block: dict) -> str:
    if block.get("score") is None:
        return "-"
    lo, hi = block["ci95"]
    return f"{100 * block['score']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def plot(rows: list[dict], path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["mean_visual_tokens"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, marker, colour in (("reading", "o", "#c44e52"), ("coarse", "s", "#4c72b0")):
        xs = [r["mean_visual_tokens"] for r in pts if r[key]["score"] is not None]
        ys = [100 * r[key]["score"] for r in pts if r[key]["score"] is not None]
        lo = [100 * (r[key]["score"] - r[key]["ci95"][0]) for r in pts if r[key]["score"] is not None]
        hi = [100 * (r[key]["ci95"][1] - r[key]["score"]) for r in pts if r[key]["score"] is not None]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=colour, capsize=3, label=f"{key} questions")
        for r, x, y in zip([r for r in pts if r[key]["score"] is not None], xs, ys):
            ax.annotate(r["tiler"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("mean visual tokens per sample")
    ax.set_ylabel("accuracy (%), 95% bootstrap interval")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(run_dir: Path, rows: list[dict], meta: dict, cfg) -> dict:
    chance = meta.get("chance") or {}
    phone = rows[0]["phone"] if rows else {}
    lines = ["# Tiler ablation (Table 2)", "",
             f"The same model trained once per tiler on the fine_print train split ({meta['counts']['train']} images; "
             f"same seed, initial weights, steps and data order), evaluated on its test split "
             f"({meta['counts']['test']} images, {cfg.dataset.format}). Chance: reading "
             f"{100 * chance.get('reading', 0):.1f}%, coarse {100 * chance.get('coarse', 0):.1f}% (short answers), "
             f"25% (multiple choice). Phone: {phone.get('device', {}).get('name', '?')} "
             f"({phone.get('device', {}).get('profile', '')}), encode + prefill per image at "
             f"{cfg.ablation.phone.tiles_per_batch} tiles per batch, chunk {cfg.ablation.phone.prefill_chunk}.", "",
             "| tiler | reading % [95% CI] | coarse % [95% CI] | visual tokens / sample | train tokens/s (stage 2) "
             "| phone s / image |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        tok = f"{r['mean_visual_tokens']:.0f}" if r["mean_visual_tokens"] is not None else "-"
        tps = f"{r['train_tokens_per_s']:.0f}" if r["train_tokens_per_s"] else "-"
        lines.append(f"| {r['tiler']} | {_pct(r['reading'])} | {_pct(r['coarse'])} | {tok} | {tps} "
                     f"| {r['phone_s_per_image']:.2f} |")
    pic = plot(rows, run_dir / "accuracy_vs_tokens.png")
    if pic:
        lines += ["", f"![accuracy against visual tokens]({pic.name})"]
    runs = [r for r in rows if r["evaluation"]]
    if runs:
        lines += ["", "Per-tiler runs (train summary, evaluation report):", ""]
        lines += [f"- {r['tiler']}: `runs/{r['tiler']}/train/summary.json`, `{r['evaluation']}`" for r in runs]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return {"report": str(path), "plot_png": str(pic) if pic else None}
