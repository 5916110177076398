"""fine_print: a generated reading benchmark that needs resolution (docs/design.md §6).

    python -m bluelm_v.data.fine_print DIR --n 2000 --seed 0          # train/val/test, both formats
    python -m bluelm_v.data.fine_print DIR --n 300 --view 112 --workers 4

Each image is large (long side 3.2-3.8 x ``view``) with the aspect ratio of a real picture:
photos (aspect ratios drawn from the embedded COCO train2017 sizes, bluelm_v/data/manifest.py),
documents, receipts (tall), banners (wide) and phone screenshots (tall). On a coloured
background sit one large shape, text-like distractors (document lines, app tiles, empty
labels, dots, strokes) and four small labels: two 2-digit numbers and two words, each in its
own colour. Questions per image (``l2-category``; ``category`` is reading or coarse):

    read_number      reading  "What is the red number?"              -> "47"
    compare_numbers  reading  "Which number is larger?"              -> "83"
    word_by_colour   reading  "Which word is blue?"                  -> "cup"
    colour_of_word   reading  "What colour is the word 'cup'?"       -> "blue"
    background       coarse   "What colour is the background?"       -> "green"
    large_shape      coarse   "Which large shape is in the image?"   -> "star"

The unreadability rule: a glyph of cap height h and advance width a (px, in the original) in an
image of W x H px, resized as a whole to V x V (V = ``view``, 384 for SigLIP), is h*V/H px tall
and a*V/W px wide; the text counts as unreadable at that view when the smaller of the two is
below UNREADABLE_PX = 4 px (under a third of a 14-px ViT patch: digits blur into one another).
Every label's font size is the largest whose glyphs are at most TARGET_PX = 3.5 px at V x V,
jittered down to 85%; at the image's own resolution the same glyphs are about 3.5x larger
(7-15 px), and the grid the relaxed tiler picks shows each at least twice as large as the V x V
view. ``legible_px`` states the rule; tests/test_fine_print.py checks it on every label.

Files (SPLIT = train | val | test; images under images/SPLIT/):
    SPLIT.jsonl   one question a line (LLaVA / lmms-eval style: question_id, image, text, answer,
                  category, l2-category, metric)
    SPLIT.tsv     the same questions as VLMEvalKit multiple choice (index, image_path or base64
                  image, question, A-D, answer letter, category, l2-category)
    stage1.json   LLaVA-format captions of the train images (stage-1 pretraining)
    stage2.json   LLaVA-format multi-turn conversations, every question of a train image in one
                  sample (short answers, and a share ``mc_fraction`` of turns in the TSV's
                  multiple-choice layout answered with the letter)
    meta.json     parameters, counts, chance accuracy per question kind, the rule
Deterministic: image i of a given seed is the same whatever ``workers`` is.
"""
from __future__ import annotations

import argparse
import json
import math
from functools import lru_cache
from pathlib import Path

from .vqa import SHORT_ANSWER_INSTRUCTION, build_prompt

UNREADABLE_PX = 4.0
TARGET_PX = 3.5
SOURCES = {"photo": 0.45, "document": 0.15, "receipt": 0.1, "banner": 0.1, "screenshot": 0.2}
BACKGROUNDS = {"red": (196, 52, 52), "green": (46, 146, 72), "blue": (52, 88, 196), "yellow": (222, 194, 44),
               "purple": (128, 62, 168), "orange": (230, 128, 34)}
INK = {"red": (214, 24, 24), "blue": (24, 56, 214), "green": (18, 136, 36), "black": (16, 16, 16),
       "purple": (132, 32, 168), "orange": (236, 112, 0)}
SHAPES = ("circle", "square", "triangle", "star")
WORDS = ("cat", "dog", "sun", "car", "box", "pen", "cup", "hat", "key", "map", "bus", "egg")
KINDS = {"read_number": "reading", "compare_numbers": "reading", "word_by_colour": "reading",
         "colour_of_word": "reading", "background": "coarse", "large_shape": "coarse"}
SPLITS = ("train", "val", "test")
LETTERS = "ABCD"


# -- the rule ----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def glyph_size(text: str, font_size: int) -> tuple[float, float]:
    """(cap height, mean advance width) in px of ``text`` at ``font_size``."""
    font = _font(font_size)
    _, top, _, bottom = font.getbbox("0")
    return float(bottom - top), font.getlength(text) / max(1, len(text))


def legible_px(glyph_h: float, glyph_w: float, width: int, height: int, view_w: float, view_h: float) -> float:
    """The size of a glyph once the W x H image is resized to view_w x view_h: the smaller of its
    scaled height and scaled width (px)."""
    return min(glyph_h * view_h / height, glyph_w * view_w / width)


def font_size_for(text: str, width: int, height: int, view: int) -> int:
    """The largest font size whose glyphs are at most TARGET_PX at the view x view resize."""
    size = 6
    while legible_px(*glyph_size(text, size + 1), width, height, view, view) <= TARGET_PX:
        size += 1
    return size


# -- scenes --------------------------------------------------------------------------------------
def image_size(rng, source: str, coco_aspects, view: int) -> tuple[int, int]:
    """(W, H): the source's aspect ratio, long side 3.2-3.8 x view."""
    aspect = {"photo": lambda: float(coco_aspects[rng.integers(len(coco_aspects))]),
              "document": lambda: rng.uniform(0.70, 0.80), "receipt": lambda: rng.uniform(0.25, 0.40),
              "banner": lambda: rng.uniform(3.0, 6.0), "screenshot": lambda: rng.uniform(0.45, 0.56)}[source]()
    long_side = rng.uniform(3.2, 3.8) * view
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    return max(view, int(round(w))), max(view // 2, int(round(h)))


def _free_box(rng, boxes, bw: int, bh: int, width: int, height: int):
    for _ in range(200):
        x, y = int(rng.integers(4, max(5, width - bw - 4))), int(rng.integers(4, max(5, height - bh - 4)))
        if all(x + bw + 6 < a or a + c + 6 < x or y + bh + 6 < b or b + d + 6 < y for a, b, c, d in boxes):
            boxes.append((x, y, bw, bh))
            return x, y
    boxes.append((0, 0, bw, bh))
    return 0, 0


def make_scene(index: int, seed: int, view: int, coco_aspects) -> dict:
    """Everything about image ``index`` (drawn from its own generator: independent of order)."""
    import numpy as np

    rng = np.random.default_rng([seed, index])
    source = str(rng.choice(list(SOURCES), p=list(SOURCES.values())))
    width, height = image_size(rng, source, coco_aspects, view)
    background = str(rng.choice(list(BACKGROUNDS)))
    numbers = [int(v) for v in rng.choice(np.arange(10, 100), size=2, replace=False)]
    words = [str(w) for w in rng.choice(WORDS, size=2, replace=False)]
    inks = [str(c) for c in rng.choice(list(INK), size=4, replace=False)]
    boxes = []
    short = min(width, height)
    size = int(short * rng.uniform(0.35, 0.55))
    shape = {"name": str(rng.choice(SHAPES)), "size": size,
             "xy": (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))),
             "fill": str(rng.choice(["white", "black"]))}
    labels = []
    for text, ink in zip([str(n) for n in numbers] + words, inks):
        fs = max(6, int(font_size_for(text, width, height, view) * rng.uniform(0.85, 1.0)))
        gh, gw = glyph_size(text, fs)
        bw, bh = int(_font(fs).getlength(text)) + 2 * max(2, fs // 3), int(gh) + 2 * max(2, fs // 3)
        x, y = _free_box(rng, boxes, bw, bh, width, height)
        labels.append({"text": text, "ink": ink, "font_size": fs, "box": [x, y, bw, bh],
                       "glyph_h": gh, "glyph_w": gw,
                       "view_px": legible_px(gh, gw, width, height, view, view)})
    return {"index": index, "source": source, "width": width, "height": height, "background": background,
            "shape": shape, "labels": labels, "numbers": numbers, "words": words,
            "distractors": int(rng.integers(18, 40)), "noise_seed": int(rng.integers(2**31))}


def render(scene: dict):
    """The scene as a PIL RGB image."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(scene["noise_seed"])
    w, h = scene["width"], scene["height"]
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32)
    coarse = rng.normal(0.0, 14.0, size=(max(2, h // 96), max(2, w // 96), 3)).astype(np.float32)
    tint = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                      dtype=np.float32) - 128                          # [H, W, 3] smooth variation
    img = Image.fromarray(np.clip(base + tint, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _layout_clutter(draw, scene, rng)
    s = scene["shape"]
    x, y, d = s["xy"][0], s["xy"][1], s["size"]
    fill = (245, 245, 245) if s["fill"] == "white" else (22, 22, 22)
    if s["name"] == "circle":
        draw.ellipse((x, y, x + d, y + d), fill=fill)
    elif s["name"] == "square":
        draw.rectangle((x + d * 0.1, y + d * 0.1, x + d * 0.9, y + d * 0.9), fill=fill)
    elif s["name"] == "triangle":
        draw.polygon([(x + d / 2, y), (x, y + d), (x + d, y + d)], fill=fill)
    else:
        pts = [(x + d / 2 + (d / 2 if k % 2 == 0 else d / 5) * math.sin(math.pi * k / 5),
                y + d / 2 - (d / 2 if k % 2 == 0 else d / 5) * math.cos(math.pi * k / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)
    for _ in range(scene["distractors"]):                               # dots, strokes, empty labels
        cx, cy, r = int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(2, 9))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 1:
            draw.line((cx, cy, cx + int(rng.integers(-40, 41)), cy + int(rng.integers(-40, 41))), fill=colour, width=2)
        else:
            draw.rectangle((cx, cy, cx + 3 * r + 8, cy + r + 6), fill=(250, 250, 250), outline=colour)
    for label in scene["labels"]:
        bx, by, bw, bh = label["box"]
        draw.rectangle((bx, by, bx + bw, by + bh), fill=(250, 250, 250))
        pad = max(2, label["font_size"] // 3)
        top = _font(label["font_size"]).getbbox("0")[1]
        draw.text((bx + pad, by + pad - top), label["text"], fill=INK[label["ink"]], font=_font(label["font_size"]))
    return img


def _layout_clutter(draw, scene: dict, rng) -> None:
    """Text-like structure of documents/receipts (grey lines) and screenshots (bars, app tiles)."""
    w, h, source = scene["width"], scene["height"], scene["source"]
    if source in ("document", "receipt"):
        step = int(rng.integers(18, 30))
        for y in range(step, h - step, step):
            if rng.random() < 0.7:
                x0 = int(rng.integers(8, max(9, w // 10)))
                draw.rectangle((x0, y, x0 + int(rng.uniform(0.3, 0.85) * w), y + max(2, step // 5)), fill=(235, 235, 235))
    elif source == "screenshot":
        draw.rectangle((0, 0, w, max(12, h // 40)), fill=(20, 20, 20))
        tile = w // 5
        for r in range(2, 2 + int(rng.integers(2, 6))):
            for c in range(4):
                if rng.random() < 0.8:
                    x0, y0 = c * tile + tile // 4, r * tile
                    draw.rounded_rectangle((x0, y0, x0 + tile * 2 // 3, y0 + tile * 2 // 3), radius=tile // 8,
                                           fill=tuple(int(v) for v in rng.integers(40, 250, 3)))


# -- questions -----------------------------------------------------------------------------------
def scene_questions(scene: dict, rng) -> list[dict]:
    """The six questions of a scene, each with its answer and four options (answer among them)."""
    (n1, n2), (w1, w2) = scene["numbers"], scene["words"]
    ink = {lab["text"]: lab["ink"] for lab in scene["labels"]}
    i = int(rng.integers(2))
    number, word = (n1, n2)[i], (w1, w2)[i]
    word_asked = (w1, w2)[int(rng.integers(2))]
    items = [
        ("read_number", f"What is the {ink[str(number)]} number?", str(number), [str(v) for v in range(10, 100)]),
        ("compare_numbers", "Which number is larger?", str(max(n1, n2)), [str(n1), str(n2)] + [str(v) for v in range(10, 100)]),
        ("word_by_colour", f"Which word is {ink[word]}?", word, list(WORDS)),
        ("colour_of_word", f"What colour is the word '{word_asked}'?", ink[word_asked], list(INK)),
        ("background", "What colour is the background?", scene["background"], list(BACKGROUNDS)),
        ("large_shape", "Which large shape is in the image?", scene["shape"]["name"], list(SHAPES)),
    ]
    out = []
    for kind, question, answer, pool in items:
        others = [p for p in dict.fromkeys(pool) if p != answer]
        if kind == "compare_numbers":                    # the smaller number is always an option
            picks = [others[0]] + [str(v) for v in rng.choice(others[1:], size=2, replace=False)]
        else:
            picks = [str(v) for v in rng.choice(others, size=3, replace=False)]
        choices = [answer] + picks
        order = rng.permutation(4)
        options = {LETTERS[k]: choices[int(j)] for k, j in enumerate(order)}
        letter = next(k for k, v in options.items() if v == answer)
        out.append({"kind": kind, "category": KINDS[kind], "question": question, "answer": answer,
                    "options": options, "letter": letter})
    return out


def chance_accuracy() -> dict:
    """Uniform guessing over each kind's answers (short answers) and over 4 options (TSV)."""
    per = {"read_number": 1 / 90, "compare_numbers": 1 / 90, "word_by_colour": 1 / len(WORDS),
           "colour_of_word": 1 / len(INK), "background": 1 / len(BACKGROUNDS), "large_shape": 1 / len(SHAPES)}
    coarse = [v for k, v in per.items() if KINDS[k] == "coarse"]
    reading = [v for k, v in per.items() if KINDS[k] == "reading"]
    return {"short_answer": per, "coarse": sum(coarse) / len(coarse), "reading": sum(reading) / len(reading),
            "multiple_choice": 0.25}


@lru_cache(maxsize=1)
def coco_aspects():
    """Width / height of the 118,287 COCO train2017 images (the embedded size manifest)."""
    from .manifest import read_size_manifest

    sizes = read_size_manifest()
    return (sizes["width"] / sizes["height"]).to_numpy()


# -- writing -------------------------------------------------------------------------------------
_ASPECTS = None


def _init_worker(aspects) -> None:
    global _ASPECTS
    _ASPECTS = aspects


def _build(job: tuple) -> dict:
    index, seed, view, out, rel = job
    scene = make_scene(index, seed, view, _ASPECTS)
    render(scene).save(Path(out) / rel, compress_level=1)
    return dict(scene, image=rel)


def _turn(q: dict, as_choice: bool, first: bool) -> list[dict]:
    images = [{"path": ""}] if first else []
    if as_choice:
        prompt = build_prompt({"question": q["question"], "options": q["options"], "images": images})
        answer = q["letter"]
    else:
        prompt = build_prompt({"question": f"{q['question']}\n{SHORT_ANSWER_INSTRUCTION}", "images": images})
        answer = q["answer"]
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def _caption(scene: dict) -> str:
    s = scene["shape"]
    return f"A {scene['background']} {scene['source']} with a large {s['fill']} {s['name']} and four small labels."


def write_split(out: Path, split: str, scenes: list[dict], seed: int, tsv_images: str, mc_fraction: float) -> dict:
    import base64

    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, SPLITS.index(split), 7])
    jsonl, rows, conversations, captions = [], [], [], []
    for scene in scenes:
        qs = scene_questions(scene, rng)
        for k, q in enumerate(qs):
            qid = f"{split}-{scene['index']:06d}-{k}"
            jsonl.append({"question_id": qid, "image": scene["image"],
                          "text": f"{q['question']}\n{SHORT_ANSWER_INSTRUCTION}", "answer": q["answer"],
                          "category": q["category"], "l2-category": q["kind"], "metric": "exact"})
            row = {"index": qid, "question": q["question"], **q["options"], "answer": q["letter"],
                   "category": q["category"], "l2-category": q["kind"]}
            if tsv_images == "base64":
                row["image"] = (base64.b64encode((out / scene["image"]).read_bytes()).decode() if k == 0
                                else f"{split}-{scene['index']:06d}-0")
            else:
                row["image_path"] = scene["image"]
            rows.append(row)
        order = rng.permutation(len(qs))
        turns = []
        for j, qi in enumerate(order):
            turns += _turn(qs[int(qi)], bool(rng.random() < mc_fraction), first=j == 0)
        conversations.append({"id": f"{split}-{scene['index']:06d}", "image": scene["image"], "conversations": turns})
        captions.append({"id": f"{split}-{scene['index']:06d}-cap", "image": scene["image"],
                         "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                           {"from": "gpt", "value": _caption(scene)}]})
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    pd.DataFrame(rows).to_csv(out / f"{split}.tsv", sep="\t", index=False)
    paths = {"jsonl": str(out / f"{split}.jsonl"), "tsv": str(out / f"{split}.tsv"), "questions": len(jsonl)}
    if split == "train":
        (out / "stage1.json").write_text(json.dumps(captions))
        (out / "stage2.json").write_text(json.dumps(conversations))
        paths.update(stage1=str(out / "stage1.json"), stage2=str(out / "stage2.json"))
    return paths


def split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def generate(out_dir, n: int = 2000, seed: int = 0, view: int = 384, val_fraction: float = 0.1,
             test_fraction: float = 0.1, workers: int = 1, tsv_images: str = "path", mc_fraction: float = 0.25,
             overwrite: bool = False) -> dict:
    """Write the benchmark under ``out_dir`` (kept when meta.json holds the same parameters,
    unless ``overwrite``). Returns {split: {"jsonl", "tsv", ...}, "image_root", "meta"}."""
    out = Path(out_dir)
    params = dict(n=n, seed=seed, view=view, val_fraction=val_fraction, test_fraction=test_fraction,
                  tsv_images=tsv_images, mc_fraction=mc_fraction, version=1)
    meta_path = out / "meta.json"
    if not overwrite and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            return meta["paths"]
    counts = split_counts(n, val_fraction, test_fraction)
    if min(counts.values()) < 1 or view < 32 or tsv_images not in ("path", "base64"):
        raise ValueError(f"fine_print: need >= 1 image per split, view >= 32, tsv_images path|base64 (got {params}, {counts})")
    from multiprocessing import get_context

    from ..job import progress

    aspects = coco_aspects()
    jobs, start = {}, 0
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs[split] = [(start + i, seed, view, str(out), f"images/{split}/{start + i:06d}.png") for i in range(counts[split])]
        start += counts[split]
    everything = [j for split in SPLITS for j in jobs[split]]
    with progress(total=len(everything), desc="fine_print images", unit="img") as bar:
        if workers > 1:
            with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(aspects,)) as pool:
                built = [s for s in pool.imap(_build, everything, chunksize=8) if bar.update(1) or True]
        else:
            _init_worker(aspects)
            built = [s for s in map(_build, everything) if bar.update(1) or True]
    paths = {"image_root": str(out), "meta": str(meta_path)}
    for split in SPLITS:
        scenes = [s for s in built if s["image"].startswith(f"images/{split}/")]
        paths[split] = write_split(out, split, scenes, seed, tsv_images, mc_fraction)
    (out / "scenes.jsonl").write_text("".join(json.dumps(s) + "\n" for s in built))
    meta = {"params": params, "paths": paths, "counts": counts, "chance": chance_accuracy(),
            "rule": {"view": view, "unreadable_px": UNREADABLE_PX, "target_px": TARGET_PX,
                     "max_label_px_at_view": max(lab["view_px"] for s in built for lab in s["labels"])}}
    meta_path.write_text(json.dumps(meta, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bluelm_v.data.fine_print",
                                 description="Generate the fine_print reading benchmark (train/val/test, JSONL + TSV).")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=2000, help="images in all splits together (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--view", type=int, default=384, help="the tile size the unreadability rule is stated at")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=1, help="processes rendering images")
    ap.add_argument("--tsv-images", choices=("path", "base64"), default="path",
                    help="TSV images as image_path (default) or embedded base64 (VLMEvalKit's layout)")
    ap.add_argument("--mc-fraction", type=float, default=0.25, help="share of training turns asked as multiple choice")
    args = ap.parse_args(argv)
    paths = generate(args.out_dir, args.n, args.seed, args.view, args.val_fraction, args.test_fraction,
                     args.workers, args.tsv_images, args.mc_fraction, overwrite=True)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
