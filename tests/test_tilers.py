"""Tilers (docs/design.md §2): the paper's worked examples, vectorised == scalar on arbitrary sizes,
degenerate strips, bad sizes, transform shapes / padding / tile order / normalisation."""
from __future__ import annotations

import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bluelm_v.errors import ConfigError, InputError
from bluelm_v.plugin_manager import get
from bluelm_v.plugins.tilers import InternVLTiler, LlavaNextTiler, RelaxedTiler, SingleTiler, fit_scalar

B = 384
PAPER_TILERS = {"llava_next": LlavaNextTiler(), "internvl": InternVLTiler(), "relaxed": RelaxedTiler()}

# docs/design.md §2.3: the paper's worked examples (grid candidates 1..3 x 1..3, InternVL max 9 tiles).
WORKED = [((394, 390), {"llava_next": (2, 2), "internvl": (1, 1), "relaxed": (1, 1)}),
          ((380, 76), {"llava_next": (1, 1), "internvl": (5, 1), "relaxed": (1, 1)}),
          ((380, 393), {"llava_next": (1, 2), "internvl": (1, 1), "relaxed": (1, 1)}),
          ((500, 102), {"llava_next": (2, 1), "internvl": (5, 1), "relaxed": (2, 1)})]


@pytest.mark.parametrize("size, expected", WORKED, ids=[f"{w}x{h}" for (w, h), _ in WORKED])
def test_paper_worked_examples_scalar_and_vectorised(size, expected):
    for name, tiler in PAPER_TILERS.items():
        assert tiler.select(*size) == expected[name], name
        m, n = tiler.select_many(np.array([size[0]]), np.array([size[1]]))
        assert (int(m[0]), int(n[0])) == expected[name], name


def test_conf_yaml_tilers_reproduce_the_worked_examples():
    """conf/tiler/*.yaml hold the paper's ablation setting."""
    _, registry, _ = get()
    for name in PAPER_TILERS:
        node = yaml.safe_load((resources.files("bluelm_v.conf") / "tiler" / f"{name}.yaml").read_text())
        tiler = registry.create_from_config("tiler", node)
        for size, expected in WORKED:
            assert tiler.select(*size) == expected[name]


# -- vectorised == scalar ------------------------------------------------------------------
side = st.one_of(
    st.integers(1, 5),                                     # 1 px and other tiny sides
    st.integers(1, 4000),
    st.integers(1, 100_000),                               # strips such as 1 x 10000
    st.integers(1, 6).map(lambda k: k * B),                # exact multiples of the tile size
    st.integers(1, 6).flatmap(lambda k: st.sampled_from([k * B - 1, k * B + 1])),
    st.integers(1, 2**31 - 1))
nice_ratio = st.builds(lambda a, b, k: (a * k, b * k), st.integers(1, 12), st.integers(1, 12), st.integers(1, 400))
sizes = st.lists(st.one_of(st.tuples(side, side), nice_ratio), min_size=1, max_size=60)  # nice: ratio ties
tiler_configs = st.one_of(
    st.builds(RelaxedTiler, max_grid=st.integers(1, 5), alpha=st.sampled_from([0.0, 0.05, 0.1, 0.25, 1.0]),
              fallback=st.sampled_from(["smallest", "closest_ratio"]), tile_size=st.sampled_from([384, 448, 14])),
    st.builds(LlavaNextTiler, max_grid=st.integers(1, 5), tile_size=st.sampled_from([384, 336, 14])),
    st.integers(1, 16).flatmap(lambda hi: st.builds(InternVLTiler, min_tiles=st.integers(1, hi), max_tiles=st.just(hi),
                                                    tile_size=st.sampled_from([384, 448]))),
    st.builds(SingleTiler))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiler=tiler_configs, pairs=sizes)
def test_vectorised_selection_equals_scalar(tiler, pairs):
    w = np.array([p[0] for p in pairs])
    h = np.array([p[1] for p in pairs])
    m, n = tiler.select_many(w, h)
    assert [tiler.select(a, b) for a, b in pairs] == list(zip(m.tolist(), n.tolist()))


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=20_000 // 400, max_size=400))
def test_vectorised_equals_scalar_across_chunk_boundaries(pairs):
    """select_many works in chunks; a long array (> one chunk) must give the same answers."""
    reps = 16384 // len(pairs) + 2
    w = np.tile([p[0] for p in pairs], reps)
    h = np.tile([p[1] for p in pairs], reps)
    for tiler in PAPER_TILERS.values():
        m, n = tiler.select_many(w, h)
        expected = [tiler.select(a, b) for a, b in pairs]
        got = list(zip(m.tolist(), n.tolist()))
        assert got == expected * reps


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000))
def test_llava_next_picks_max_effective_then_min_waste(w, h):
    """docs/design.md §2.1 stated as an argmax: largest Re, then smallest Rw, then the earliest candidate."""
    tiler = PAPER_TILERS["llava_next"]
    scored = [(fit_scalar(w, h, m * B, n * B), i, (m, n)) for i, (m, n) in enumerate(tiler.candidates)]
    best = min(scored, key=lambda s: (-s[0][0], s[0][1], s[1]))[2]
    assert tiler.select(w, h) == best


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000))
def test_relaxed_with_zero_alpha_reaches_the_maximum_effective_resolution(w, h):
    """With alpha = 0 only strictly better Re is accepted, so the final Re is the maximum."""
    tiler = RelaxedTiler(alpha=0.0)
    m, n = tiler.select(w, h)
    best_re = max(fit_scalar(w, h, a * B, b * B)[0] for a, b in tiler.candidates)
    assert best_re == 0 or fit_scalar(w, h, m * B, n * B)[0] == best_re


@pytest.mark.parametrize("k, l", [(k, l) for k in (1, 2, 3) for l in (1, 2, 3)])
def test_exact_tile_multiples_get_their_own_grid(k, l):
    """An image that is exactly k x l tiles fills canvas (k, l) with no waste and no scaling."""
    for name, tiler in PAPER_TILERS.items():
        assert tiler.select(k * B, l * B) == (k, l), name


def test_internvl_tie_prefers_larger_grid_only_for_large_images():
    """Equal aspect-ratio difference: move to the later (more tiles) candidate only when the
    image area exceeds half the candidate canvas (docs/design.md §2.2)."""
    tiler = InternVLTiler()
    assert tiler.select(400, 400) == (1, 1)     # 160000 < 0.5 * 384^2 * 4
    assert tiler.select(600, 600) == (2, 2)     # 360000 > 294912, < 663552 (3x3)
    assert tiler.select(900, 900) == (3, 3)     # 810000 > 663552
    assert tiler.select(380, 76) == (5, 1)      # ignores absolute size: a 25x area blow-up


# -- degenerate and bad sizes ----------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 10000), (10000, 1), (1, 100_000), (2, 2**31 - 1)])
def test_degenerate_strips_never_crash_and_are_flagged(size):
    w, h = np.array([size[0]]), np.array([size[1]])
    for name, tiler in PAPER_TILERS.items():
        grid = tiler.select(*size)
        assert grid in tiler.candidates, name
        assert (int(tiler.select_many(w, h)[0][0]), int(tiler.select_many(w, h)[1][0])) == grid
    assert RelaxedTiler().select(*size) == (1, 1)                    # documented default fallback
    assert PAPER_TILERS["relaxed"].degenerate_many(w, h).tolist() == [True]
    assert PAPER_TILERS["llava_next"].degenerate_many(w, h).tolist() == [True]
    tall = size[1] > size[0]
    assert RelaxedTiler(fallback="closest_ratio").select(*size) == ((1, 3) if tall else (3, 1))


def test_ordinary_sizes_are_not_degenerate():
    w, h = np.array([1, 640, 30, 1]), np.array([1, 480, 10000, 1000])
    assert PAPER_TILERS["relaxed"].degenerate_many(w, h).tolist() == [False] * 4


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (-3, 4), (4, -1), (2**31, 5), (2.5, 3)])
def test_zero_negative_or_absurd_sizes_are_input_errors(size):
    for tiler in PAPER_TILERS.values():
        with pytest.raises(InputError):
            tiler.select(*size)
        with pytest.raises(InputError, match=r"sizes\[1\]"):
            tiler.select_many(np.array([10, size[0]]), np.array([10, size[1]]))


# -- crop counts and transforms --------------------------------------------------------------
def test_num_crops_counts_the_thumbnail_by_policy_for_ints_and_arrays():
    m, n = np.array([1, 2, 3]), np.array([1, 1, 3])
    assert LlavaNextTiler().num_crops(m, n).tolist() == [2, 3, 10]          # thumbnail always, first
    assert InternVLTiler().num_crops(m, n).tolist() == [1, 3, 10]           # only when > 1 tile
    assert RelaxedTiler(thumbnail="none").num_crops(m, n).tolist() == [1, 2, 9]
    assert SingleTiler().num_crops(1, 1) == 1 and LlavaNextTiler().num_crops(2, 2) == 5


def _quadrants(w, h):
    """An image with four solid colour quadrants (TL red, TR green, BL blue, BR white)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2:] = (0, 255, 0)
    img[h // 2:, : w // 2] = (0, 0, 255)
    img[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(img)


@pytest.mark.parametrize("tiler", [LlavaNextTiler(), RelaxedTiler(), InternVLTiler()], ids=["llava_next", "relaxed", "internvl"])
def test_tiles_are_row_major_with_m_along_the_width(tiler):
    crops = tiler.transform(_quadrants(2 * B, 2 * B))
    assert (crops.grid.m, crops.grid.n) == (2, 2) and crops.n_crops == 5
    tiles = [i for i in range(5) if i != crops.thumbnail_index]
    centre = crops.pixels[tiles, :, B // 2, B // 2]                       # [4, 3]
    expected = [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]]         # TL, TR, BL, BR
    assert np.allclose(centre.numpy(), expected, atol=0.02)
    thumb = crops.pixels[crops.thumbnail_index]                           # the whole image squashed
    assert np.allclose(thumb[:, B // 4, B // 4].numpy(), [1, -1, -1], atol=0.02)
    assert crops.thumbnail_index == (4 if isinstance(tiler, InternVLTiler) else 0)


def test_padded_canvas_centres_the_resized_image_on_black():
    """500x102 -> relaxed (2,1): canvas 768x384, image resized to 768x157, 113 rows above."""
    crops = RelaxedTiler().transform(Image.new("RGB", (500, 102), (255, 255, 255)))
    assert crops.pixels.shape == (3, 3, B, B) and crops.pixels.dtype.is_floating_point
    top = (B - 157) // 2
    for tile in crops.pixels[1:]:                                          # the two local tiles
        assert (tile[:, : top - 1] == -1).all() and (tile[:, top + 158:] == -1).all()   # black pad
        assert np.allclose(tile[:, top + 2: top + 155].numpy(), 1.0, atol=1e-6)          # image
    # 300x1000 -> llava_next (1,3): canvas 384x1152, the height limits: 346 px wide, 19 px each side
    tall = LlavaNextTiler().transform(Image.new("RGB", (300, 1000), (255, 255, 255)))
    assert (tall.grid.m, tall.grid.n) == (1, 3)
    local = tall.pixels[1:]                                                # [3, 3, B, B]
    assert (local[:, :, :, :18] == -1).all() and (local[:, :, :, 19 + 346 + 1:] == -1).all()
    assert np.allclose(local[:, :, :, 21:19 + 344].numpy(), 1.0, atol=1e-6)


def test_internvl_stretches_without_padding_and_adds_thumbnail_only_for_several_tiles():
    many = InternVLTiler().transform(Image.new("RGB", (380, 76), (255, 255, 255)))
    assert (many.grid.m, many.grid.n) == (5, 1) and many.pixels.shape == (6, 3, B, B)
    assert np.allclose(many.pixels.numpy(), 1.0, atol=1e-6)               # no black anywhere
    one = InternVLTiler().transform(Image.new("RGB", (400, 400), (0, 0, 0)))
    assert one.pixels.shape == (1, 3, B, B) and one.thumbnail_index is None
    assert (one.pixels == -1).all()                                        # (x/255 - 0.5) / 0.5


def test_llava_next_one_by_one_gives_two_crops_and_any_mode_is_accepted():
    crops = LlavaNextTiler().transform(Image.new("L", (300, 200), 128))
    assert crops.n_crops == 2 and crops.pixels.shape == (2, 3, B, B) and crops.image_size == (300, 200)
    rgba = RelaxedTiler().transform(np.zeros((50, 60, 4), np.uint8))        # HWC array input
    assert rgba.pixels.shape[1:] == (3, B, B)


def test_single_and_degenerate_transforms():
    assert SingleTiler().transform(Image.new("RGB", (1000, 30))).pixels.shape == (1, 3, B, B)
    assert SingleTiler(mode="pad").transform(Image.new("RGB", (1000, 30))).pixels.shape == (1, 3, B, B)
    strip = RelaxedTiler().transform(Image.new("RGB", (1, 10000), (255, 255, 255)))
    assert strip.pixels.shape == (2, 3, B, B) and strip.grid.tiles == 1


# -- registration ----------------------------------------------------------------------------
def test_registered_with_descriptions_and_checked_parameters():
    _, registry, _ = get()
    assert {"relaxed", "llava_next", "internvl", "single"} <= set(registry.tiler.names())
    assert all(registry.tiler.describe(n)["description"] for n in ("relaxed", "llava_next", "internvl", "single"))
    with pytest.raises(ConfigError, match="tiler.alpha"):
        registry.create_from_config("tiler", {"name": "relaxed", "alpha": 1.5})
    with pytest.raises(ConfigError, match="tiler.thumbnail"):
        registry.create_from_config("tiler", {"name": "llava_next", "thumbnail": "middle"})
    with pytest.raises(ConfigError, match="min_tiles"):
        registry.create_from_config("tiler", {"name": "internvl", "min_tiles": 5, "max_tiles": 4})


def test_importing_tilers_does_not_import_torch():
    code = "import sys, bluelm_v.plugins.tilers; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
