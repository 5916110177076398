"""report.md of an evaluation: the score table with 95% intervals, skipped questions by reason,
scores.png (per category, interval whiskers) and rendered examples (image, question, answer,
prediction) under examples/."""
from __future__ import annotations

import textwrap
from pathlib import Path


def fmt_score(block: dict | None) -> tuple[str, str, str]:
    """(score %, interval %, n) as table cells."""
    if not block or block.get("score") is None:
        return "-", "-", str((block or {}).get("n", 0))
    lo, hi = block["ci95"]
    return f"{100 * block['score']:.1f}", f"[{100 * lo:.1f}, {100 * hi:.1f}]", str(block["n"])


def score_rows(summary: dict) -> list[tuple[str, dict]]:
    rows = [("all", {"score": summary["score"], "ci95": summary["score_ci95"], "n": summary["n_scored"]})]
    for key, label in (("by_category", "category"), ("by_l2_category", "l2-category")):
        rows += [(f"{label} {name}", block) for name, block in (summary.get(key) or {}).items()]
    return rows


def plot_scores(rows: list[tuple[str, dict]], path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, b) for name, b in rows if b.get("score") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    scores = [100 * b["score"] for _, b in rows]
    err = [[100 * (b["score"] - b["ci95"][0]) for _, b in rows], [100 * (b["ci95"][1] - b["score"]) for _, b in rows]]
    ax.barh(ys, scores, xerr=err, color="#4c72b0", capsize=3)
    ax.set_yticks(ys, [name for name, _ in rows])
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (%), 95% bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_example(record: dict, question: dict, path: Path, width: int = 520) -> Path | None:
    """The question's first image (scaled to ``width``) above its question, answer and prediction."""
    from PIL import Image, ImageDraw, ImageFont

    from bluelm_v.jobs.evaluate.answer import load_question_images

    pictures, _, _ = load_question_images(question)
    image = pictures[0] if pictures else None
    if image is not None:
        image.thumbnail((width, width))
    font = ImageFont.load_default(size=14)
    question = record["prompt"].replace("<image>\n", "")
    lines = []
    for label, text in (("Q", question), ("answer", record["answer"]), ("prediction", record.get("prediction") or "")):
        wrapped = textwrap.wrap(f"{label}: {text}", 70) or [f"{label}:"]
        lines += wrapped
    lines.append(f"score {record['score']:.2f}")
    band = 20 * len(lines) + 10
    top = image.height if image is not None else 0
    canvas = Image.new("RGB", (width, top + band), "white")
    if image is not None:
        canvas.paste(image, ((width - image.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        colour = (0, 110, 0) if record["score"] >= 1.0 else (170, 0, 0) if line.startswith("prediction") else (20, 20, 20)
        draw.text((8, top + 5 + 20 * i), line, fill=colour, font=font)
    canvas.save(path)
    return path


def pick_examples(records: list[dict], n: int) -> list[dict]:
    """Up to n scored questions: the first right ones and the first wrong ones, half each."""
    scored = [r for r in records if r.get("score") is not None]
    right = [r for r in scored if r["score"] >= 1.0][: (n + 1) // 2]
    wrong = [r for r in scored if r["score"] < 1.0][: n - len(right)]
    return right + wrong


def write(run_dir: Path, records: list[dict], summary: dict, questions: dict, n_examples: int = 6) -> Path:
    """report.md (+ scores.png, examples/); ``questions``: id -> question, for the pictures."""
    rows = score_rows(summary)
    lines = ["# Evaluation", "",
             f"Dataset `{summary['dataset']}`; model: "
             + (f"checkpoint `{summary['model']['checkpoint']}`" if summary["model"]["checkpoint"] else "built from the config")
             + f". {summary['n_questions']} questions, {summary['n_scored']} scored"
             + (f", {sum(summary['skipped'].values())} skipped" if summary["skipped"] else "") + ".", "",
             "| set | score (%) | 95% interval | n |", "|---|---:|---|---:|"]
    lines += [f"| {name} | " + " | ".join(fmt_score(block)) + " |" for name, block in rows]
    if summary.get("choice_not_extracted") is not None:
        lines += ["", f"Multiple-choice answers naming no single option (scored 0): {summary['choice_not_extracted']}."]
    if summary["skipped"]:
        lines += ["", "| skipped: reason | questions |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(summary["skipped"].items())]
        detail = [r for r in records if r.get("skipped")][:5]
        lines += ["", "First skipped: " + "; ".join(f"{r['id']}: {r.get('detail')}" for r in detail)]
    if summary.get("mean_visual_tokens") is not None:
        lines += ["", f"Mean visual tokens per question: {summary['mean_visual_tokens']:.0f}."]
    plot = plot_scores(rows, run_dir / "scores.png")
    if plot:
        lines += ["", f"![scores]({plot.name})"]
    examples = pick_examples(records, n_examples)
    if examples:
        (run_dir / "examples").mkdir(exist_ok=True)
        lines += ["", "## Examples", ""]
        for k, rec in enumerate(examples):
            pic = render_example(rec, questions[rec["id"]], run_dir / "examples" / f"example_{k}.png")
            lines += [f"![{rec['id']}](examples/{pic.name})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
