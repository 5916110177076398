"""The tiling rules of other models (docs/design.md §5): hand-computed examples, the references
themselves where transformers ships them (smart_resize, Idefics3's resize steps,
select_best_resolution), the vectorised rule against its one-size restatement on arbitrary
sizes, and extreme sizes through every registered tiler."""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluelm_v.errors import InputError
from bluelm_v.plugin_manager import get
from bluelm_v.plugins.tilers import (Idefics3Tiler, InternVLTiler, LlavaNextTiler, LlavaOneVisionTiler, MiniCPMVTiler,
                                     Phi3VisionTiler, Qwen2VLTiler, Qwen3VLTiler, RelaxedTiler)

REGISTRY = get()[1]
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def preset(name):
    """A tiler from conf/tiler/NAME.yaml (the released settings)."""
    node = yaml.safe_load((resources.files("bluelm_v.conf") / "tiler" / f"{name}.yaml").read_text())
    return REGISTRY.create_from_config("tiler", node)


# (preset, (w, h)) -> (m, n, crops, tokens), each worked by hand in docs/design.md §5.
HAND = [
    ("qwen2_vl", (640, 480), (1, 1, 1, 391)),      # 480/28 -> 17, 640/28 -> 23: 17 * 23
    ("qwen2_vl", (70, 70), (1, 1, 1, 4)),          # 70/28 = 2.5 rounds to even 2: 56 x 56 (half-up: 84, 9 tokens)
    ("qwen2_vl", (10, 10), (1, 1, 1, 4)),          # rounds to 0 x 0 < min_pixels: beta 5.6 -> 56 x 56
    ("qwen2_vl", (200, 1), (1, 1, 1, 29)),         # ratio 200 is allowed: 812 x 28
    ("qwen2_vl", (100000, 100000), (1, 1, 1, 16384)),  # max_pixels = 3584^2: 128 x 128
    ("qwen3_vl", (640, 480), (1, 1, 1, 300)),      # 480/32 = 15, 640/32 = 20
    ("minicpm_v", (448, 448), (1, 1, 1, 64)),      # area = one 448^2: no slicing
    ("minicpm_v", (449, 448), (2, 1, 3, 192)),     # multiple 2: [2,1] is nearest log(449/448)
    ("minicpm_v", (500, 500), (1, 2, 3, 192)),     # [1,2] and [2,1] tie at log 2: the first wins
    ("minicpm_v", (1000, 1000), (2, 2, 5, 320)),   # multiple 5 -> counts 4,5,6: [2,2] exact
    ("minicpm_v", (640, 480), (2, 1, 3, 192)),
    ("llava_onevision", (640, 480), (2, 2, 5, 2929)),   # 54x54 map, unpad to 40 rows: 729 + 40*54 + 40
    ("llava_onevision", (1, 1), (1, 1, 2, 1485)),        # 729 + 27*27 + 27
    ("llava_onevision", (100000, 100000), (6, 6, 37, 7371)),  # 162x162, t = 2 -> 81x81: 729 + 6561 + 81
    ("llava_next_v16", (336, 336), (1, 2, 3, 1176)),   # (336, 672) read as (w, h) comes first; 576 + 24*24 + 24
    ("llava_next_v16", (672, 672), (2, 2, 5, 2928)),   # 576 + 48*48 + 48
    ("llava_next_v16", (1000, 300), (3, 1, 4, 2182)),  # (1008, 336); unpad 24 -> 22 rows: 576 + 22*72 + 22
    ("internvl_448", (300, 400), (3, 4, 13, 3328)),    # ratio 0.75 exactly: 12 tiles + thumbnail, 256 each
    ("internvl_448", (448, 448), (1, 1, 1, 256)),      # one tile, no thumbnail (never 3x3)
    ("idefics3", (386, 386), (4, 4, 17, 2873)),        # longest edge to 1456: 4x4 tiles of 364 + global
    ("idefics3", (640, 480), (4, 3, 13, 2197)),        # 1456 x 1092
    ("phi3_vision", (640, 480), (4, 3, 13, 1921)),     # scale 4: 1344 x 1008; 13*144 + 1 + 4*12
    ("phi3_vision", (300, 400), (3, 4, 13, 1933)),     # transposed: 1008 wide, 1344 high; + 5*12
    ("relaxed", (640, 480), (2, 2, 5, 980)),           # today's rules keep 196 per crop
    ("internvl", (300, 400), (2, 3, 7, 1372)),
]


@pytest.mark.parametrize("name, size, expected", HAND, ids=[f"{n}-{s[0]}x{s[1]}" for n, s, _ in HAND])
def test_hand_computed_examples(name, size, expected):
    tiler = preset(name)
    d = tiler.decide(*size)
    assert (d["m"], d["n"], d["crops"], d["tokens"]) == expected and d["skip"] == ""
    assert tiler.tokens(*size) == expected[3]
    assert tiler.tokens(np.array([size[0]]), np.array([size[1]])).tolist() == [expected[3]]


def test_variants_change_what_their_reference_changes():
    assert Idefics3Tiler("smolvlm").decide(386, 386)["tokens"] == 17 * 81
    assert Idefics3Tiler("smolvlm_small").decide(386, 386)["tokens"] == 17 * 64
    assert Phi3VisionTiler(hd_num=4).decide(640, 480)["tokens"] == 5 * 144 + 1 + 3 * 12   # 2x2 crops
    assert MiniCPMVTiler(version=2.5).decide(1000, 1000)["tokens"] == 5 * 96
    assert Qwen2VLTiler(max_pixels=1_003_520).decide(100000, 100000)["tokens"] == 35 * 35  # sqrt(1003520)/28 = 35.8
    small = Qwen2VLTiler(max_pixels=1_003_520).decide(4000, 3000)
    assert small["pixels"] <= 1_003_520 and small["tokens"] == small["pixels"] // 28**2


# -- the references themselves (transformers 5.x ships them) ---------------------------------
sides = st.one_of(st.integers(1, 60), st.integers(1, 5000), st.integers(1, 100_000),
                  st.integers(1, 200).map(lambda k: 14 * k))       # exact .5 roundings at factor 28


@settings(max_examples=400, deadline=None)
@given(w=sides, h=sides, which=st.sampled_from([(28, 3136, 12_845_056), (28, 3136, 1_003_520), (32, 65_536, 16_777_216)]))
def test_qwen_matches_transformers_smart_resize(w, h, which):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor, lo, hi = which
    tiler = Qwen2VLTiler(factor, lo, hi)
    try:
        h_ref, w_ref = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
    except ValueError:
        assert tiler.decide(w, h)["skip"] == "aspect_ratio_over_200"
        return
    d = tiler.decide(w, h)
    assert (d["pixels"], d["tokens"]) == (w_ref * h_ref, (w_ref // factor) * (h_ref // factor))


def _idefics3_reference(w, h, L, T):
    """transformers' Idefics3 steps 1-3 (its resize functions, its resize_for_vision_encoder
    with the pixel resize replaced by returning the size it asks for)."""
    from transformers.models.idefics3 import image_processing_pil_idefics3 as ref

    H, W = ref._resize_output_size_rescale_to_max_len(h, w, max_len=L)
    H, W = ref._resize_output_size_scale_below_upper_bound(H, W, max_len=ref.MAX_IMAGE_SIZE)
    proc = ref.Idefics3ImageProcessorPil.__new__(ref.Idefics3ImageProcessorPil)
    proc.resize = lambda image, size, resample=None, **kw: (size.width, size.height)
    return proc.resize_for_vision_encoder(np.zeros((3, H, W), np.uint8), T)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=sides, h=sides, variant=st.sampled_from(["idefics3", "smolvlm", "smolvlm_small"]))
def test_idefics3_matches_transformers_resize_steps(w, h, variant):
    tiler = Idefics3Tiler(variant)
    W, H = _idefics3_reference(w, h, tiler.longest_edge, tiler.tile_size)
    d = tiler.decide(w, h)
    if W == 0 or H == 0:
        assert d["skip"] == "zero_side_after_resize"
        return
    T = tiler.tile_size
    rows, cols = -(-H // T), -(-W // T)
    assert d["pixels"] == W * H and d["crops"] == (rows * cols + 1 if H > T or W > T else 1)


@settings(max_examples=300, deadline=None)
@given(w=sides, h=sides)
def test_anyres_grids_match_select_best_resolution_in_the_repositorys_order(w, h):
    """transformers reads pinpoints as (height, width); handing it each pinpoint swapped makes
    it scan the candidates in the LLaVA repository's (width, height) order."""
    from transformers.image_processing_utils import select_best_resolution

    for tiler, pinpoints in ((preset("llava_next_v16"), V16_PINPOINTS),
                             (LlavaOneVisionTiler(), [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)])):
        best_h, best_w = select_best_resolution((h, w), [(ph, pw) for pw, ph in pinpoints])
        d = tiler.decide(w, h)
        assert (d["m"], d["n"]) == (best_w // tiler.tile_size, best_h // tiler.tile_size)


def test_llava_next_orientation_differs_from_transformers_reading_for_small_images():
    """docs/design.md §5.2: the repository's (width, height) reading picks 1 column x 2 rows for
    a 336 x 336 image; reading the same list as (height, width) picks 2 columns x 1 row."""
    from transformers.image_processing_utils import select_best_resolution

    assert preset("llava_next_v16").select(336, 336) == (1, 2)
    assert select_best_resolution((336, 336), V16_PINPOINTS) == (336, 672)   # (height, width): 2 columns


# -- vectorised == the one-size restatement ------------------------------------------------
any_side = st.one_of(st.integers(1, 8), st.integers(1, 6000), st.integers(1, 100_000), st.integers(1, 2**31 - 1))
ratio_ties = st.builds(lambda a, b, k: (a * k, b * k), st.integers(1, 12), st.integers(1, 12), st.integers(1, 300))
size_lists = st.lists(st.one_of(st.tuples(any_side, any_side), ratio_ties), min_size=1, max_size=40)
rules = st.one_of(
    st.builds(Qwen2VLTiler, max_pixels=st.sampled_from([1_003_520, 12_845_056])), st.builds(Qwen3VLTiler),
    st.builds(MiniCPMVTiler, max_slice_nums=st.integers(1, 12), version=st.sampled_from([2.6, 2.5])),
    st.builds(LlavaOneVisionTiler, max_grid=st.integers(1, 6), anyres_max=st.sampled_from([0, 4, 9])),
    st.builds(LlavaNextTiler, tile_size=st.just(336), pinpoints=st.just(V16_PINPOINTS), unpad=st.just(True)),
    st.builds(Idefics3Tiler, variant=st.sampled_from(["idefics3", "smolvlm", "smolvlm_small"]),
              longest_edge=st.sampled_from([None, 364, 728, 3000])),
    st.builds(Phi3VisionTiler, hd_num=st.integers(1, 20)),
    st.builds(InternVLTiler, tile_size=st.just(448), max_tiles=st.integers(1, 12), tokens_per_crop=st.just(256)),
    st.builds(RelaxedTiler, alpha=st.sampled_from([0.0, 0.1, 0.5])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiler=rules, pairs=size_lists)
def test_vectorised_rule_equals_its_one_size_restatement(tiler, pairs):
    d = tiler.decide_many(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    for i, (w, h) in enumerate(pairs):
        ref = tiler.decide(w, h)
        got = {k: getattr(d, k)[i] for k in ref}
        assert got == ref, (type(tiler).__name__, w, h)


# -- extreme sizes ---------------------------------------------------------------------------
EXTREME = [(1, 100000), (100000, 1), (1, 1), (28, 28), (100000, 100000)]
SKIPS = {("qwen2_vl", (1, 100000)), ("qwen2_vl", (100000, 1)), ("qwen3_vl", (1, 100000)), ("qwen3_vl", (100000, 1)),
         ("phi3_vision", (1, 100000)), ("phi3_vision", (100000, 1))}


@pytest.mark.parametrize("name", REGISTRY.tiler.names())
def test_extreme_sizes_never_crash_and_skip_only_where_the_reference_fails(name):
    tiler = REGISTRY.tiler.create(name)
    d = tiler.decide_many(np.array([s[0] for s in EXTREME]), np.array([s[1] for s in EXTREME]))
    for i, size in enumerate(EXTREME):
        if (name, size) in SKIPS:
            assert d.skip[i] and d.tokens[i] == -1 and d.crops[i] == 0
            with pytest.raises(InputError, match=d.skip[i]):
                tiler.select(*size)
        else:
            assert d.skip[i] == "" and d.tokens[i] > 0 and d.crops[i] >= 1, size
            assert tiler.select(*size) == (d.m[i], d.n[i])


def test_size_only_rules_refuse_transform_in_one_line():
    from PIL import Image

    for tiler in (Qwen2VLTiler(), MiniCPMVTiler()):
        with pytest.raises(InputError, match="sizes and visual tokens only"):
            tiler.transform(Image.new("RGB", (64, 64)))


@pytest.mark.parametrize("name", ["llava_onevision", "idefics3", "phi3_vision", "llava_next_v16", "internvl_448"])
def test_tile_rules_transform_into_their_crop_count(name):
    from PIL import Image

    tiler = preset(name)
    crops = tiler.transform(Image.new("RGB", (500, 300), (255, 255, 255)))
    B = tiler.tile_size
    assert crops.pixels.shape == (tiler.decide(500, 300)["crops"], 3, B, B)
