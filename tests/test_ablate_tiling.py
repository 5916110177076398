"""The tiling ablation job: size manifests, the header scan of LLaVA-format data, validation,
third-party tilers, and end-to-end runs (Ray, 2 CPUs) with bad inputs counted, never fatal."""
from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bluelm_v import hookimpl
from bluelm_v.data.image_sizes import read_image_size
from bluelm_v.data.llava_sizes import read_llava_records
from bluelm_v.data.manifest import COCO_TRAIN2017_IMAGES, read_size_manifest, split_bad_sizes
from bluelm_v.errors import ConfigError, InputError
from bluelm_v.jobs import ablate_tiling
from bluelm_v.jobs.ablate_tiling import report
from bluelm_v.plugin_manager import get, load_plugins

# The job needs only the tiler family; the others are deleted so this file tests the job alone.
ONLY_TILERS = ["~encoder", "~downsampler", "~projector", "~llm", "~quantizer", "~backend"]
WORKED = {(394, 390): {"llava_next": (2, 2), "internvl": (1, 1), "relaxed": (1, 1)},
          (380, 76): {"llava_next": (1, 1), "internvl": (5, 1), "relaxed": (1, 1)},
          (380, 393): {"llava_next": (1, 2), "internvl": (1, 1), "relaxed": (1, 1)},
          (500, 102): {"llava_next": (2, 1), "internvl": (5, 1), "relaxed": (2, 1)}}


@pytest.fixture
def ablation_cfg(compose):
    return lambda *overrides: compose(["+experiment=ablate_tiling", *ONLY_TILERS, *overrides])


# -- manifests -------------------------------------------------------------------------------
def test_manifest_keeps_extra_columns_skips_blank_lines_and_reads_gzip(tmp_path):
    text = "width,height,source\n640,480,coco\n\n 500 , 102 ,vg\n"
    (tmp_path / "m.csv").write_text(text)
    with gzip.open(tmp_path / "m.csv.gz", "wt") as fh:
        fh.write(text)
    for name in ("m.csv", "m.csv.gz"):
        table = read_size_manifest(tmp_path / name)
        assert table[["width", "height"]].values.tolist() == [[640, 480], [500, 102]]
        assert table["source"].tolist() == ["coco", "vg"] and table["line"].tolist() == [2, 4]


@pytest.mark.parametrize("text, where", [
    ("w,h\n1,2\n", "line 1: missing column(s) width, height"),
    ("width,source\n1,a\n", "line 1: missing column(s) height"),
    ("", "line 1: empty file")])
def test_a_manifest_without_a_usable_header_fails_at_once(tmp_path, text, where):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(InputError) as err:
        read_size_manifest(tmp_path / "bad.csv")
    assert where in str(err.value) and "bad.csv" in str(err.value)


def test_bad_rows_are_skipped_with_their_reason_never_dropped(tmp_path):
    """A row that is just `,` (and any other malformed row) is counted with its reason and line."""
    (tmp_path / "m.csv").write_text("width,height\n640,480\n,\n5,abc\n1.5,2\n1,2,3\n\n7\n")
    good, bad = split_bad_sizes(read_size_manifest(tmp_path / "m.csv"))
    assert good[["width", "height", "line"]].values.tolist() == [[640, 480, 2]]
    assert list(zip(bad["line"], bad["reason"], bad["detail"])) == [
        (3, "missing_size", "width = ''"), (4, "not_an_integer", "height = 'abc'"),
        (5, "not_an_integer", "width = '1.5'"), (6, "wrong_field_count", "3 fields, the header has 2"),
        (8, "wrong_field_count", "1 fields, the header has 2")]


def test_zero_negative_and_huge_sizes_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "m.csv").write_text("width,height\n640,480\n0,5\n-3,4\n5,99999999999\n")
    good, bad = split_bad_sizes(read_size_manifest(tmp_path / "m.csv"))
    assert good[["width", "height"]].values.tolist() == [[640, 480]]
    assert list(zip(bad["line"], bad["reason"])) == [(3, "nonpositive_size"), (4, "nonpositive_size"),
                                                     (5, "size_too_large")]


def test_embedded_default_is_the_real_coco_train2017_sizes():
    table = read_size_manifest()
    assert len(table) == COCO_TRAIN2017_IMAGES == 118_287
    assert table["width"].max() == 640 and table["height"].max() == 640 and table["width"].min() > 0


# -- header scan and LLaVA records -------------------------------------------------------------
def _png_header_only(path, width, height):
    """A valid PNG signature + IHDR claiming width x height, one empty IDAT, IEND (no pixels)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def _make_images(root):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (390, 394, 3), np.uint8)).save(root / "ok.jpg", quality=90)
    Image.new("RGB", (500, 102), (9, 9, 9)).save(root / "ok.png")
    data = (root / "ok.jpg").read_bytes()
    (root / "cut_tail.jpg").write_bytes(data[: len(data) // 2])
    (root / "cut_head.jpg").write_bytes(data[:20])
    (root / "text.jpg").write_text("not an image at all\n")
    (root / "empty.png").write_bytes(b"")
    (root / "trailer.jpg").write_bytes(data + b"\x00motion-photo-video" * 200)  # data after EOI
    _png_header_only(root / "bomb.png", 100_000, 100_000)


def test_header_scan_reasons_and_bomb_measured_from_header(tmp_path):
    _make_images(tmp_path)
    (tmp_path / "folder.jpg").mkdir()
    got = {p: read_image_size(tmp_path / p) for p in
           ("ok.jpg", "ok.png", "cut_tail.jpg", "cut_head.jpg", "text.jpg", "empty.png", "trailer.jpg",
            "bomb.png", "missing.jpg", "folder.jpg")}
    assert got["ok.jpg"] == (394, 390, "ok") and got["ok.png"] == (500, 102, "ok")
    assert got["cut_tail.jpg"][2] == "truncated" and got["cut_head.jpg"][2] == "truncated"
    assert got["text.jpg"][2] == "not_an_image" and got["empty.png"][2] == "empty_file"
    assert got["trailer.jpg"] == (394, 390, "ok")            # end marker not at the end, decodes fine
    assert got["bomb.png"] == (100_000, 100_000, "ok")       # 1e10 px: above PIL's limit, not decoded
    assert got["missing.jpg"][2] == "missing_file" and got["folder.jpg"][2] == "not_a_file"
    assert read_image_size(tmp_path / "cut_tail.jpg", check_end=False) == (394, 390, "ok")


def test_llava_records_count_per_sample_and_classify_bad_records(tmp_path):
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    records = [{"id": "a", "image": "x.jpg", "conversations": conv}, {"id": "b", "image": "x.jpg", "conversations": conv},
               {"id": "t", "conversations": conv}, {"id": "m", "image": 5, "conversations": conv},
               ["not", "a", "record"], {"id": "c", "image": "y.jpg"}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    samples, skipped = read_llava_records(tmp_path / "d.json")
    assert samples["image"].tolist() == ["x.jpg", "x.jpg"] and samples["row"].tolist() == [0, 1]
    assert dict(zip(skipped["row"], skipped["reason"])) == {2: "text_only", 3: "malformed_record",
                                                           4: "malformed_record", 5: "malformed_record"}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n{oops\n")
    samples, skipped = read_llava_records(tmp_path / "d.jsonl")
    assert len(samples) == 2 and skipped[["row", "reason"]].values.tolist() == [[3, "malformed_record"]]
    (tmp_path / "broken.json").write_text('[\n{"id": 1},\n{"id": 2,,}\n]')
    with pytest.raises(InputError, match="line 3"):
        read_llava_records(tmp_path / "broken.json")


# -- validation and third-party tilers ---------------------------------------------------------
def test_validate_names_the_bad_key(ablation_cfg, tmp_path):
    _, registry, _ = get()
    with pytest.raises(ConfigError, match=r"ablation.tilers\[1\]: no tiler named 'llava_nxt'.*Did you mean 'llava_next'"):
        ablate_tiling.validate(ablation_cfg("ablation.tilers=[relaxed,llava_nxt]"), registry)
    with pytest.raises(ConfigError, match="ablation.reference: 'internvl' is not one of"):
        ablate_tiling.validate(ablation_cfg("ablation.tilers=[relaxed,llava_next]", "ablation.reference=internvl"), registry)
    with pytest.raises(ConfigError, match=r"ablation.overrides.relaxed.alpah: unknown parameter"):
        ablate_tiling.validate(ablation_cfg("ablation.overrides={relaxed: {alpah: 0.2}}"), registry)
    with pytest.raises(ConfigError, match=r"ablation.overrides.relaxed.alpha: 2.0 is out of range"):
        ablate_tiling.validate(ablation_cfg("+ablation.overrides.relaxed.alpha=2.0"), registry)
    with pytest.raises(ConfigError, match=r"ablation.overrides.single: not one of ablation.tilers"):
        ablate_tiling.validate(ablation_cfg("ablation.overrides={single: {mode: pad}}"), registry)
    with pytest.raises(ConfigError, match="dataset.manifest: no such file"):
        ablate_tiling.validate(ablation_cfg(f"dataset.manifest={tmp_path}/nope.csv"), registry)
    with pytest.raises(ConfigError, match="dataset.image_root"):
        (tmp_path / "d.json").write_text("[]")
        ablate_tiling.validate(ablation_cfg(f"dataset.llava_json={tmp_path}/d.json"), registry)
    ablate_tiling.validate(ablation_cfg("ablation.overrides={relaxed: {alpha: 0.2}}"), registry)
    assert ablate_tiling.tiler_params(ablation_cfg("ablation.overrides={relaxed: {alpha: 0.2}}"), registry,
                                      "relaxed")[1]["alpha"] == 0.2
    with pytest.raises(ConfigError, match=r"ablation.tilers: a non-empty list of tiler names / presets, or 'all'"):
        ablate_tiling.validate(ablation_cfg("ablation.tilers=everything"), registry)
    with pytest.raises(ConfigError, match=r"pricing.prefill_chunk: a positive integer"):
        ablate_tiling.validate(ablation_cfg("pricing.prefill_chunk=0"), registry)


def test_top_level_tiler_settings_apply_to_the_ablation_tiler_of_that_name(ablation_cfg):
    """The README's `tiler.alpha=0.2` sets the compared relaxed tiler's alpha; a tiler setting
    that matches no compared tiler fails naming the setting and the job."""
    _, registry, _ = get()
    cfg = ablation_cfg("tiler.alpha=0.2")
    ablate_tiling.validate(cfg, registry)
    name, params, origin = ablate_tiling.tiler_params(cfg, registry, "relaxed")
    assert (name, params["alpha"], origin) == ("relaxed", 0.2, "tiler (the top-level node)")
    over = ablation_cfg("tiler.alpha=0.2", "+ablation.overrides.relaxed.alpha=0.3")
    assert ablate_tiling.tiler_params(over, registry, "relaxed")[1]["alpha"] == 0.3      # overrides win
    elsewhere = ablation_cfg("tiler.alpha=0.2", "ablation.tilers=[llava_next,internvl]", "ablation.reference=llava_next")
    with pytest.raises(ConfigError, match=r"tiler.alpha=0.2: the ablate_tiling job compares ablation.tilers "
                                          r"\['llava_next', 'internvl'\], and none is tiler 'relaxed'"):
        ablate_tiling.validate(elsewhere, registry)
    ablate_tiling.validate(ablation_cfg("ablation.tilers=[llava_next,internvl]", "ablation.reference=llava_next"),
                           registry)                                   # the untouched default tiler is fine
    every = ablation_cfg("ablation.tilers=all")
    assert {"qwen2_vl", "llava_next_v16", "internvl_448", "relaxed"} <= set(ablate_tiling.labels(every, registry))
    assert ablate_tiling.tiler_params(every, registry, "internvl_448")[:2] == (
        "internvl", {"tile_size": 448, "min_tiles": 1, "max_tiles": 12, "thumbnail": "auto", "tokens_per_crop": 256})


class HalfTiler:
    """A minimal third-party tiler (bluelm_v.types.Tiler, no optional members): two tiles when wide."""

    def __init__(self, tile_size: int = 384):
        self.tile_size = tile_size

    def select(self, width, height):
        return (2, 1) if width > height else (1, 1)

    def select_many(self, widths, heights):
        wide = np.asarray(widths) > np.asarray(heights)
        return np.where(wide, 2, 1), np.ones(len(wide), np.int64)

    def num_crops(self, m, n):
        return m * n

    def transform(self, image):
        raise NotImplementedError("the ablation only selects grids")


class HalfPlugin:
    @hookimpl
    def bluelm_v_register(self, registry):
        registry.tiler.register("half", HalfTiler, description="two tiles when wide")


def test_a_third_party_tiler_is_validated_and_compared(ablation_cfg):
    from bluelm_v.plugins.tilers.zoo import decide_all

    _, registry, _ = load_plugins(extra=[HalfPlugin()])
    ablate_tiling.validate(ablation_cfg("ablation.tilers=[relaxed,half]"), registry)
    tilers = {"relaxed": registry.tiler.create("relaxed"), "half": registry.tiler.create("half")}
    w, h = np.array([394, 500, 380, 640]), np.array([390, 102, 393, 480])
    decided, _ = decide_all(tilers, w, h)
    half = decided["half"][0]
    assert half.m.tolist() == [2, 2, 1, 2] and half.crops.tolist() == [2, 2, 1, 2]
    assert half.tokens.tolist() == [392, 392, 196, 392]                 # crops x ablation.tokens_per_crop
    table = ablate_tiling.decisions_table(pd.DataFrame({"width": w, "height": h}), decided, tilers, {})
    params = {"relaxed": ("relaxed", {}, "x"), "half": ("half", {}, "y")}
    summary = report.summarize(table, tilers, params, "relaxed", decided, {}, {}, pd.DataFrame({"reason": []}),
                               {"kind": "manifest"}, (1024,))
    relaxed_tiles = np.array([a * b for a, b in (tilers["relaxed"].select(x, y) for x, y in zip(w, h))])
    half_tiles = np.array([2, 2, 1, 2])
    assert summary["pairs"]["relaxed_vs_half"]["smaller"] == int((relaxed_tiles < half_tiles).sum())
    assert summary["pairs"]["relaxed_vs_half"]["larger"] == int((relaxed_tiles > half_tiles).sum())
    assert summary["tilers"]["half"]["mean_upscale"] is None             # no pixel figures from a minimal tiler


# -- end to end (one Ray start for the module) ------------------------------------------------
@pytest.fixture(scope="module")
def ray_once():
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


def _run(cfg, run_dir, status="ok"):
    from bluelm_v.launch import run
    summary = run(cfg, run_dir)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == on_disk["status"] == status and on_disk["n_images"] == summary["n_images"]
    return summary


@pytest.mark.slow
def test_end_to_end_manifest(ablation_cfg, tmp_path, ray_once):
    from bluelm_v.plugins.tilers import RelaxedTiler

    coco = read_size_manifest().sample(300, random_state=0)
    rows = [*map(tuple, coco[["width", "height"]].values.tolist()), *WORKED, (1, 10000), (0, 480), (-1, 5)]
    manifest = tmp_path / "sizes.csv"
    manifest.write_text("width,height\n" + "".join(f"{w},{h}\n" for w, h in rows) + ",\n")
    run_dir = tmp_path / "run"
    names = ["relaxed", "llava_next", "internvl", "qwen2_vl"]
    summary = _run(ablation_cfg(f"dataset.manifest={manifest}", "ray.num_cpus=2", "ablation.shard_size=50",
                                f"ablation.tilers=[{','.join(names)}]", "tiler.alpha=0.2"), run_dir)

    n = len(rows) - 2
    assert summary["n_images"] == n and summary["n_skipped"] == 3 and summary["work"]["n_shards"] >= 2
    assert summary["skipped_reasons"] == {"missing_size": 1, "nonpositive_size": 2}
    skipped = pd.read_csv(run_dir / "skipped.csv")
    assert sorted(zip(skipped["row"], skipped["reason"])) == [                      # file lines
        (len(rows), "nonpositive_size"), (len(rows) + 1, "nonpositive_size"), (len(rows) + 2, "missing_size")]
    dec = pd.read_parquet(run_dir / "decisions.parquet")
    assert len(dec) == n and {f"{t}_{c}" for t in names[:3] for c in ("m", "n", "crops", "tokens")} <= set(dec.columns)
    assert "qwen2_vl_m" not in dec.columns                                           # no tile grid
    relaxed = RelaxedTiler(alpha=0.2)                                                # tiler.alpha applied
    assert summary["tilers"]["relaxed"]["params"]["alpha"] == 0.2
    assert [relaxed.select(w, h) for w, h in zip(dec.width, dec.height)] == list(zip(dec.relaxed_m, dec.relaxed_n))
    for (w, h), grids in WORKED.items():
        row = dec[(dec.width == w) & (dec.height == h)].iloc[0]
        assert {t: (row[f"{t}_m"], row[f"{t}_n"]) for t in names[1:3]} == {t: grids[t] for t in names[1:3]}
    assert (dec["relaxed_tokens"] == 196 * dec["relaxed_crops"]).all()
    strip = dec[(dec.width == 1) & (dec.height == 10000)].iloc[0]
    assert pd.isna(strip["qwen2_vl_tokens"]) and strip["qwen2_vl_skip"] == "aspect_ratio_over_200"
    assert summary["tilers"]["qwen2_vl"]["skip_reasons"] == {"aspect_ratio_over_200": 1}
    assert summary["tilers"]["relaxed"]["n_degenerate"] == 1
    for t in names[:3]:
        assert sum(summary["tilers"][t]["tile_count_histogram"].values()) == n
    ref_tiles = dec.relaxed_m * dec.relaxed_n
    for t in ("llava_next", "internvl"):
        pair, tiles = summary["pairs"][f"relaxed_vs_{t}"], dec[f"{t}_m"] * dec[f"{t}_n"]
        assert (pair["smaller"], pair["same"], pair["larger"]) == (
            int((ref_tiles < tiles).sum()), int((ref_tiles == tiles).sum()), int((ref_tiles > tiles).sum()))
    phone = summary["tilers"]["internvl"]["phone"]                                    # priced on the simulated phone
    seconds = (dec.internvl_encode_s + dec.internvl_prefill_s).astype(float)
    assert phone["total_hours"] == pytest.approx(seconds.sum() / 3600, rel=1e-5) and phone["mean_s"] > 0
    assert dec.qwen2_vl_encode_s.isna().sum() == 1                                    # the skipped strip
    text = (run_dir / "report.md").read_text()
    assert "phone-hours" in text and "> 1,024" in text
    for png in ("tile_counts.png", "grid_map.png", "token_cdf.png"):
        assert f"]({png})" in text and (run_dir / png).stat().st_size > 1000


@pytest.mark.slow
def test_every_row_skipped_ends_failed_with_the_reason(ablation_cfg, tmp_path, ray_once):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("width,height\n,\n0,5\nx,4\n")
    summary = _run(ablation_cfg(f"dataset.manifest={manifest}", "ray.num_cpus=2"), tmp_path / "run", status="failed")
    assert summary["reason"].startswith("every one of the 3 input rows was skipped")
    assert summary["skipped_reasons"] == {"missing_size": 1, "nonpositive_size": 1, "not_an_integer": 1}
    assert len(pd.read_csv(tmp_path / "run" / "skipped.csv")) == 3


@pytest.mark.slow
def test_end_to_end_llava_json_bad_files_and_cache(ablation_cfg, tmp_path, ray_once):
    root = tmp_path / "images"
    root.mkdir()
    _make_images(root)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a picture"}]
    recs = [{"id": f"s{i}", "image": "ok.jpg", "conversations": conv} for i in range(3)]   # one image, 3 samples
    recs += [{"id": "p", "image": "ok.png", "conversations": conv}, {"id": "b", "image": "bomb.png", "conversations": conv},
             {"id": "t", "conversations": conv}, {"id": "m", "image": ["a.jpg"], "conversations": conv},
             {"id": "x", "image": "missing.jpg", "conversations": conv}, {"id": "c", "image": "cut_tail.jpg", "conversations": conv},
             {"id": "n", "image": "text.jpg", "conversations": conv}, 17]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(recs))
    overrides = [f"dataset.llava_json={data}", f"dataset.image_root={root}", "ray.num_cpus=2", "dataset.files_per_task=2"]
    overrides.append("pricing.enabled=false")
    first = _run(ablation_cfg(*overrides), tmp_path / "runs" / "a")

    assert first["n_images"] == 5
    assert first["skipped_reasons"] == {"malformed_record": 2, "missing_file": 1, "not_an_image": 1,
                                        "text_only": 1, "truncated": 1}
    assert first["dataset"]["n_scanned"] == 6 and first["dataset"]["n_over_pil_pixel_limit"] == 1
    dec = pd.read_parquet(tmp_path / "runs" / "a" / "decisions.parquet")
    assert dec.groupby("image").size().to_dict() == {"bomb.png": 1, "ok.jpg": 3, "ok.png": 1}
    assert dec.loc[dec.image == "bomb.png", ["width", "height"]].values.tolist() == [[100_000, 100_000]]
    skipped = pd.read_csv(tmp_path / "runs" / "a" / "skipped.csv")
    assert sorted(skipped["row"].tolist()) == [5, 6, 7, 8, 9, 10]

    second = _run(ablation_cfg(*overrides), tmp_path / "runs" / "b")     # a rerun reads the cache
    assert second["dataset"]["cache_hit"] and second["dataset"]["n_scanned"] == 0
    assert second["dataset"]["cache_file"].startswith(str(tmp_path / "runs" / "size_cache"))
    assert pd.read_parquet(tmp_path / "runs" / "b" / "decisions.parquet").equals(dec)
    assert second["pairs"] == first["pairs"]
