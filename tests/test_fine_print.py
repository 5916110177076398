"""The fine_print benchmark generator: deterministic, both formats for every split, answers that
match the drawn scene, and the unreadability rule (every label below 4 px once the whole image
is resized to 384x384, at least twice that in the grid the relaxed tiler picks)."""
from __future__ import annotations

import json

import pytest

from bluelm_v.data import fine_print as fp


@pytest.fixture(scope="module")
def bench384(tmp_path_factory):
    out = tmp_path_factory.mktemp("fine_print384")
    return out, fp.generate(out, n=10, seed=3, view=384, val_fraction=0.2, test_fraction=0.2)


def scenes(root):
    return [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]


def test_every_label_is_unreadable_at_384_and_readable_in_the_relaxed_grid(bench384):
    from bluelm_v.plugin_manager import get

    root, _ = bench384
    relaxed = get()[1].tiler.create("relaxed", tile_size=384, max_grid=3)
    tiled = []
    for s in scenes(root):
        w, h = s["width"], s["height"]
        assert 3.2 * 384 - 1 <= max(w, h) <= 3.8 * 384 + 1            # large images, real aspect ratios
        m, n = relaxed.select(w, h)
        scale = min(m * 384 / w, n * 384 / h)                          # relaxed: aspect-preserving canvas
        for lab in s["labels"]:
            gh, gw = fp.glyph_size(lab["text"], lab["font_size"])      # re-measured from the font
            single = fp.legible_px(gh, gw, w, h, 384, 384)
            assert single < fp.UNREADABLE_PX                            # the rule, at 384x384
            assert min(gh, gw) >= 6                                     # readable at full resolution
            tiled.append(min(gh, gw) * scale)
            assert tiled[-1] >= 2 * single and tiled[-1] >= 5          # the relaxed grid: twice as large
    assert sorted(tiled)[len(tiled) // 2] >= 7                          # median label: 7 px or more


def test_both_formats_every_split_and_answers_match_the_scene(bench384):
    from bluelm_v.data.vqa import read_questions

    root, paths = bench384
    by_image = {s["image"]: s for s in scenes(root)}
    counts = json.loads((root / "meta.json").read_text())["counts"]
    assert counts == {"train": 6, "val": 2, "test": 2}
    for split in fp.SPLITS:
        short = read_questions(paths[split]["jsonl"])
        choice = read_questions(paths[split]["tsv"])
        assert len(short) == len(choice) == 6 * counts[split]
        assert [q["id"] for q in short] == [q["id"] for q in choice]
        for q, c in zip(short, choice):
            scene = by_image[str(q["images"][0]["path"]).split(str(root) + "/")[1]]
            kind = q["l2_category"]
            assert c["options"][c["answers"][0]] == q["answers"][0] and len(c["options"]) == 4
            ink = {lab["text"]: lab["ink"] for lab in scene["labels"]}
            answer = q["answers"][0]
            if kind == "read_number":
                assert int(answer) in scene["numbers"] and f"{ink[answer]} number" in q["question"]
            elif kind == "compare_numbers":
                assert int(answer) == max(scene["numbers"])
            elif kind == "word_by_colour":
                assert answer in scene["words"] and f"is {ink[answer]}?" in q["question"]
            elif kind == "colour_of_word":
                word = q["question"].split("'")[1]
                assert answer == ink[word]
            elif kind == "background":
                assert answer == scene["background"]
            else:
                assert answer == scene["shape"]["name"]
    train = json.loads((root / "stage2.json").read_text())
    assert len(train) == counts["train"] and all(len(r["conversations"]) == 12 for r in train)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in train)


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    a = fp.generate(tmp_path / "a", n=5, seed=11, view=64, val_fraction=0.2, test_fraction=0.2, workers=1)
    b = fp.generate(tmp_path / "b", n=5, seed=11, view=64, val_fraction=0.2, test_fraction=0.2, workers=2)
    c = fp.generate(tmp_path / "c", n=5, seed=12, view=64, val_fraction=0.2, test_fraction=0.2)
    for name in ("scenes.jsonl", "stage1.json", "stage2.json", "train.jsonl", "test.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for img in sorted((tmp_path / "a" / "images").rglob("*.png")):
        assert img.read_bytes() == (tmp_path / "b" / img.relative_to(tmp_path / "a")).read_bytes()
    assert (tmp_path / "a" / "scenes.jsonl").read_text() != (tmp_path / "c" / "scenes.jsonl").read_text()
    assert a["test"]["questions"] == b["test"]["questions"] == c["test"]["questions"] == 6


def test_command_line_writes_base64_tsv(tmp_path):
    import subprocess
    import sys

    from bluelm_v.data.vqa import read_questions

    done = subprocess.run([sys.executable, "-m", "bluelm_v.data.fine_print", str(tmp_path), "--n", "3", "--view", "48",
                           "--val-fraction", "0.34", "--test-fraction", "0.34", "--tsv-images", "base64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    qs = read_questions(tmp_path / "test.tsv")
    assert len(qs) == 6 and all("base64" in q["images"][0] for q in qs)
    assert len({q["images"][0]["base64"] for q in qs}) == 1          # one picture, referenced by the others
