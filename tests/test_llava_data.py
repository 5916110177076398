"""LLaVA-format data (bluelm_v/data/llava.py) and the generated shapes set (data/shapes.py):
bad samples are skipped and counted by reason, labels cover assistant turns only, images go
through the configured tiler, lengths include the visual tokens."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def parts():
    from bluelm_v.plugin_manager import get
    from bluelm_v.tokenizer import ByteTokenizer

    registry = get()[1]
    return registry, ByteTokenizer()


def write_dataset(root, records):
    from PIL import Image

    (root / "img").mkdir(exist_ok=True)
    Image.new("RGB", (800, 400), (200, 30, 30)).save(root / "img" / "wide.png")
    Image.new("RGB", (100, 100), (30, 30, 200)).save(root / "img" / "small.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


GOOD = [
    {"id": "wide", "image": "img/wide.png", "conversations": conv("<image>\nColour?", "red")},
    {"id": "small", "image": "img/small.png", "conversations": conv("What is it?\n<image>", "blue square")},
    {"id": "text", "conversations": conv("Say hi", "hi")},
]
BAD = [
    ({"id": "m1", "conversations": "oops"}, "malformed"),
    ({"id": "m2", "conversations": [{"from": "human", "value": "no answer"}]}, "malformed"),
    ("not a record", "malformed"),
    ({"id": "gone", "image": "img/missing.png", "conversations": conv("<image>\nx", "y")}, "missing_image"),
    ({"id": "broken", "image": "img/broken.png", "conversations": conv("<image>\nx", "y")}, "bad_image"),
    ({"id": "noph", "image": "img/small.png", "conversations": conv("no placeholder", "y")}, "no_image_token"),
    ({"id": "two", "image": "img/small.png", "conversations": conv("<image> and <image>", "y")}, "too_many_image_tokens"),
    ({"id": "textph", "conversations": conv("<image> but no image", "y")}, "too_many_image_tokens"),
    ({"id": "long", "conversations": conv("z" * 1600, "y")}, "too_long"),
]


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, parts):
    from collections import Counter

    from bluelm_v.data.llava import LlavaDataset

    registry, tok = parts
    path = write_dataset(tmp_path, GOOD + [r for r, _ in BAD])
    ds = LlavaDataset(path, tmp_path, registry.tiler.create("relaxed"), tok, tokens_per_crop=196, max_length=1500)
    assert [r["id"] for r in ds.records] == ["wide", "small", "text"]
    assert dict(ds.skipped) == dict(Counter(reason for _, reason in BAD))
    summary = ds.summary()
    assert summary["records"] == len(GOOD) + len(BAD) and summary["kept"] == 3


def test_items_through_the_tiler_with_assistant_only_labels(tmp_path, parts):
    from bluelm_v.chat import IMAGE_TOKEN_ID
    from bluelm_v.data.llava import LlavaDataset

    registry, tok = parts
    tiler = registry.tiler.create("relaxed")
    ds = LlavaDataset(write_dataset(tmp_path, GOOD), tmp_path, tiler, tok, tokens_per_crop=196, max_length=4096)
    wide = ds[0]
    m, n = tiler.select(800, 400)
    assert len(wide["images"]) == 1 and wide["images"][0].shape == (tiler.num_crops(m, n), 3, 384, 384)
    assert wide["input_ids"].count(IMAGE_TOKEN_ID) == 1
    assert wide["length"] == len(wide["input_ids"]) - 1 + tiler.num_crops(m, n) * 196
    labelled = [t for t, lab in zip(wide["input_ids"], wide["labels"]) if lab != -100]
    assert tok.decode(labelled).strip() == "red"                       # the answer (+ its end token)
    single = LlavaDataset(write_dataset(tmp_path, GOOD), tmp_path, registry.tiler.create("single"), tok, 196)
    assert single[0]["images"][0].shape[0] == 1                        # stage 1: one fixed crop
    assert ds[2]["images"] == []                                       # text-only sample


def test_undecodable_image_is_replaced_and_counted(tmp_path, parts):
    from bluelm_v.data.llava import LlavaDataset

    registry, tok = parts
    path = write_dataset(tmp_path, GOOD)
    ds = LlavaDataset(path, tmp_path, registry.tiler.create("single"), tok, 196)
    (tmp_path / "img" / "wide.png").write_bytes((tmp_path / "img" / "wide.png").read_bytes()[:60])  # truncate
    item = ds[0]
    assert item["index"] == 1 and ds.skipped["bad_image"] == 1
    ds[0]
    assert ds.skipped["bad_image"] == 1                                # remembered, not decoded again


def test_unusable_file_is_an_input_error(tmp_path, parts):
    from bluelm_v.data.llava import LlavaDataset
    from bluelm_v.errors import InputError

    registry, tok = parts
    tiler = registry.tiler.create("single")
    with pytest.raises(InputError, match="not found"):
        LlavaDataset(tmp_path / "nope.json", tmp_path, tiler, tok, 196)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        LlavaDataset(tmp_path / "bad.json", tmp_path, tiler, tok, 196)
    (tmp_path / "none.json").write_text(json.dumps([r for r, _ in BAD[:3]]))
    with pytest.raises(InputError, match="none of its 3 samples"):
        LlavaDataset(tmp_path / "none.json", tmp_path, tiler, tok, 196)


def test_shapes_dataset_is_consistent_and_holds_out_pairs(tmp_path):
    from PIL import Image

    from bluelm_v.data.shapes import COLOURS, chance_accuracy, generate
    from bluelm_v.data.llava import load_records

    paths = generate(tmp_path, n_train=30, n_eval=12, image_size=64, heldout_pairs=2, seed=3)
    stage1, stage2, evals = (load_records(paths[k]) for k in ("stage1", "stage2", "eval"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    held = {tuple(p) for p in meta["heldout_pairs"]}
    assert len(stage1) == 30 and len(stage2) == 90 and len(evals) == 12
    for rec in stage1:   # captions name what was drawn: check the pixel colour at the shape
        words = rec["conversations"][1]["value"].split()
        assert (words[1], words[2]) not in held
        assert Image.open(tmp_path / rec["image"]).size == (64, 64)
    img = Image.open(tmp_path / stage1[0]["image"]).convert("RGB")
    colour = stage1[0]["conversations"][1]["value"].split()[1]
    ref = COLOURS[colour]
    assert any(sum(abs(a - b) for a, b in zip(px, ref)) < 80 for px in img.getdata())
    assert {r["kind"] for r in evals} == {"colour", "shape", "position"}
    assert all(r["answer"] in r["choices"] for r in evals)
    assert not ({r["image"] for r in evals} & {r["image"] for r in stage2})   # held-out images
    assert meta["chance"]["mean"] == pytest.approx(chance_accuracy()["mean"])
    assert generate(tmp_path, n_train=30, n_eval=12, image_size=64, heldout_pairs=2, seed=3) == paths
