"""A generated, learnable multimodal dataset: coloured shapes with captions and questions.

Each image holds one shape (circle, square or triangle) in one of four colours at one of four
positions (left, right, top, bottom) on a lightly noisy background, with random size and
jitter. Written in LLaVA format (docs/design.md §4: a JSON list of {id, image, conversations}) + PNGs:

    stage1.json   captions        "<image>\\nDescribe the image."  -> "a red circle on the left."
    stage2.json   questions       "<image>\\nWhat colour is the shape?" -> "red"   (+ shape, position)
    eval.json     held-out questions on images never used for training; each record also has
                  "answer" and "kind" (colour | shape | position) for scoring
    meta.json     the vocabulary of answers and the chance accuracy of each kind

``heldout_pairs`` (colour, shape) pairs never appear in training images; eval records mark them
with "seen_pair": false, so the summary can report compositional generalisation separately.

    python -m bluelm_v.data.shapes /tmp/shapes --n-train 2000 --n-eval 200
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}
QUESTIONS = {   # the first form is always used; paraphrases=True draws among all of them
    "colour": ("What colour is the shape?", "Which colour does the shape have?"),
    "shape": ("What shape is it?", "Which shape is shown?"),
    "position": ("Where is the shape?", "On which side is the shape?"),
}
CAPTION_PROMPTS = ("Describe the image.", "What do you see?", "Give a short caption.")


@dataclass(frozen=True)
class ShapeScene:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
        return f"a {self.colour} {self.shape} {where[self.position]}."

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}[kind]


def chance_accuracy() -> dict[str, float]:
    """Accuracy of a uniform guess per question kind, and their mean (eval has equal kinds)."""
    per = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
    return {**per, "mean": sum(per.values()) / len(per)}


def draw_scene(scene: ShapeScene, size: int, rng: random.Random):
    """Render one scene as a PIL RGB image of size x size pixels."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 245) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(size // 8):  # faint speckle so the background is never one constant value
        x, y = rng.randrange(size), rng.randrange(size)
        shade = rng.randint(170, 255)
        draw.point((x, y), fill=(shade, shade, shade))
    r = rng.uniform(0.16, 0.22) * size                      # half the shape's extent, px
    centres = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
    fx, fy = centres[scene.position]
    cx = fx * size + rng.uniform(-0.05, 0.05) * size
    cy = fy * size + rng.uniform(-0.05, 0.05) * size
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _scenes(n: int, rng: random.Random, allowed_pairs: list[tuple[str, str]]) -> list[ShapeScene]:
    return [ShapeScene(*rng.choice(allowed_pairs), rng.choice(POSITIONS)) for _ in range(n)]


def _conv(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]


def generate(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, image_size: int = 192,
             heldout_pairs: int = 0, paraphrases: bool = False, seed: int = 0,
             overwrite: bool = False) -> dict[str, str]:
    """Write the dataset under ``out_dir`` (skipped when meta.json says it already holds the same
    parameters, unless ``overwrite``). Returns the paths of the JSON files and the image root."""
    out = Path(out_dir)
    params = dict(n_train=n_train, n_eval=n_eval, image_size=image_size, heldout_pairs=heldout_pairs,
                  paraphrases=paraphrases, seed=seed)
    paths = {"stage1": str(out / "stage1.json"), "stage2": str(out / "stage2.json"),
             "eval": str(out / "eval.json"), "image_root": str(out), "meta": str(out / "meta.json")}
    meta_path = out / "meta.json"
    if not overwrite and meta_path.exists() and json.loads(meta_path.read_text()).get("params") == params:
        return paths
    if n_train < 1 or n_eval < 1 or image_size < 16:
        raise ValueError(f"shapes: need n_train >= 1, n_eval >= 1, image_size >= 16 (got {params})")
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if not 0 <= heldout_pairs < len(pairs):
        raise ValueError(f"shapes: heldout_pairs must be in [0, {len(pairs) - 1}], got {heldout_pairs}")
    held = rng.sample(pairs, heldout_pairs)
    seen = [p for p in pairs if p not in held]
    (out / "images").mkdir(parents=True, exist_ok=True)

    ask = (lambda kind: rng.choice(QUESTIONS[kind])) if paraphrases else (lambda kind: QUESTIONS[kind][0])
    caption_prompt = (lambda: rng.choice(CAPTION_PROMPTS)) if paraphrases else (lambda: CAPTION_PROMPTS[0])
    stage1, stage2, evals = [], [], []
    for i, scene in enumerate(_scenes(n_train, rng, seen)):
        rel = f"images/train_{i:06d}.png"
        draw_scene(scene, image_size, rng).save(out / rel)
        stage1.append({"id": f"cap{i}", "image": rel,
                       "conversations": _conv(caption_prompt(), scene.caption)})
        # Every training image carries all three question kinds (one record per question).
        for kind in QUESTIONS:
            stage2.append({"id": f"qa{i}_{kind}", "image": rel,
                           "conversations": _conv(ask(kind), scene.answer(kind))})
    rng.shuffle(stage2)
    eval_pairs = pairs if held else seen
    for i, scene in enumerate(_scenes(n_eval, rng, eval_pairs)):
        rel = f"images/eval_{i:06d}.png"
        draw_scene(scene, image_size, rng).save(out / rel)
        kind = list(QUESTIONS)[i % len(QUESTIONS)]  # equal numbers of each kind
        evals.append({"id": f"eval{i}", "image": rel, "kind": kind, "answer": scene.answer(kind),
                      "seen_pair": (scene.colour, scene.shape) in seen,
                      "choices": list(ANSWERS[kind]), "conversations": _conv(ask(kind), scene.answer(kind))})

    for name, rows in (("stage1", stage1), ("stage2", stage2), ("eval", evals)):
        Path(paths[name]).write_text(json.dumps(rows))
    meta = {"params": params, "answers": {k: list(v) for k, v in ANSWERS.items()},
            "chance": chance_accuracy(), "heldout_pairs": [list(p) for p in held],
            "counts": {"stage1": len(stage1), "stage2": len(stage2), "eval": len(evals)}}
    meta_path.write_text(json.dumps(meta, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the coloured-shapes LLaVA-format dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--heldout-pairs", type=int, default=0)
    ap.add_argument("--paraphrases", action="store_true", help="vary the wording of prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = generate(args.out_dir, args.n_train, args.n_eval, args.image_size, args.heldout_pairs,
                     args.paraphrases, args.seed, overwrite=True)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
