"""The length-aware data path (bluelm_v/data/llava.py): every sample's LLM length is known at
construction without decoding an image, equals the length of the loaded item, and is cached on
disk (text scan + image headers) so a second construction, or another tiler, re-reads nothing;
bad samples are still counted by reason; a replacement for an undecodable image fits the row."""
from __future__ import annotations

import pytest

from test_llava_data import BAD, GOOD, write_dataset


@pytest.fixture(scope="module")
def parts():
    from bluelm_v.plugin_manager import get
    from bluelm_v.tokenizer import ByteTokenizer

    return get()[1], ByteTokenizer()


def _count_decodes(monkeypatch):
    from PIL import Image

    calls = {"n": 0}
    real = Image.Image.load

    def load(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Image.Image, "load", load)
    return calls


def test_lengths_known_without_decoding_and_equal_loaded_items(tmp_path, parts, monkeypatch):
    from bluelm_v.data.llava import LlavaDataset
    from bluelm_v.jobs.train.packing import spliced_length

    registry, tok = parts
    path = write_dataset(tmp_path, GOOD + [r for r, _ in BAD])
    decodes = _count_decodes(monkeypatch)
    ds = LlavaDataset(path, tmp_path, registry.tiler.create("relaxed"), tok, 196, max_length=1500,
                      cache_dir=tmp_path / "cache")
    assert decodes["n"] == 0                                          # headers only
    assert ds.scan_info["text_cache"] == "written" and ds.scan_info["image_sizes"]["n_scanned"] == 4      # wide, small, missing, broken
    assert sorted(ds.skipped.elements()) == sorted(reason for _, reason in BAD)
    for i in range(len(ds)):
        item = ds[i]
        assert item["length"] == ds.lengths[i] == spliced_length(item, 196)
    assert decodes["n"] > 0                                           # loading does decode


def test_second_construction_and_another_tiler_read_only_the_cache(tmp_path, parts, monkeypatch):
    from bluelm_v.data import image_sizes, llava
    from bluelm_v.data.llava import LlavaDataset

    registry, tok = parts
    path = write_dataset(tmp_path, GOOD + [r for r, _ in BAD])
    cache = tmp_path / "cache"
    first = LlavaDataset(path, tmp_path, registry.tiler.create("relaxed"), tok, 196, max_length=1500, cache_dir=cache)

    def fail(*a, **k):
        raise AssertionError("scanned again")

    monkeypatch.setattr(llava, "scan_text", fail)
    monkeypatch.setattr(image_sizes, "read_image_size", fail)
    again = LlavaDataset(path, tmp_path, registry.tiler.create("relaxed"), tok, 196, max_length=1500, cache_dir=cache)
    assert again.lengths == first.lengths and again.skipped == first.skipped
    assert again.scan_info["text_cache"] == "hit" and again.scan_info["image_sizes"]["n_scanned"] == 0
    single = LlavaDataset(path, tmp_path, registry.tiler.create("single"), tok, 196, max_length=1500, cache_dir=cache)
    # the wide 800x400 image: relaxed tiles it into several crops, single makes one
    assert single.lengths[0] < first.lengths[0] and single.lengths[2] == first.lengths[2]
    path.write_text(path.read_text() + " ")                           # the file changed: its text is rescanned
    with pytest.raises(AssertionError, match="scanned again"):
        LlavaDataset(path, tmp_path, registry.tiler.create("relaxed"), tok, 196, max_length=1500, cache_dir=cache)


def test_replacement_for_an_undecodable_image_fits_the_packed_row(tmp_path, parts):
    from bluelm_v.data.llava import LlavaDataset

    registry, tok = parts
    order = [GOOD[1], GOOD[0], GOOD[2]]                              # small, wide, text
    ds = LlavaDataset(write_dataset(tmp_path, order), tmp_path, registry.tiler.create("relaxed"), tok, 196)
    (tmp_path / "img" / "small.png").write_bytes((tmp_path / "img" / "small.png").read_bytes()[:60])
    assert ds.lengths[1] > ds.lengths[0] > ds.lengths[2]
    item = ds.get(0, fits=ds.lengths[0])                              # the wide one would overflow the row
    assert item["index"] == 2 and ds.skipped["bad_image"] == 1
    assert ds[0]["index"] == 1                                        # without a limit: the next sample
