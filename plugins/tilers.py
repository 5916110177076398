"""Built-in tilers (docs/design.md §2): ``relaxed`` (BlueLM-V-3B), ``llava_next``, ``internvl``, ``single``.

A tiler maps an image size (w, h) to a grid (m, n) -- m tiles along the WIDTH, n along the
HEIGHT -- and an image to crops [K, 3, B, B] (B = ``tile_size``, K = m*n + thumbnail):

    select(w, h) -> (m, n)                scalar rule, exactly as docs/design.md §2.1-2.3 states it
    select_many(ws, hs) -> (ms, ns)       the same rule over numpy arrays (identical answers)
    degenerate_many(ws, hs) -> bool[N]    sizes no candidate can hold (see "Degenerate sizes")
    num_crops(m, n)                       crops incl. thumbnail; ints or numpy arrays
    transform(image) -> Crops             pixels normalised for SigLIP (mean = std = 0.5)

Thumbnail policies (``thumbnail=``): ``first`` (always, index 0: LLaVA-NeXT, and relaxed which
follows it), ``last`` (always, index K-1), ``auto`` (last, only when m*n > 1: InternVL 1.5),
``none``.

Degenerate sizes: for an extreme strip (1 x 10000 px) every candidate canvas scales the short
side below one pixel, so every effective resolution Re is 0. ``llava_next``'s rule (largest Re,
then smallest waste) still defines a grid there: the smallest canvas, 1:1. ``relaxed``
(Algorithm 1) accepts no candidate; it then returns its ``fallback`` grid [choice]:
``smallest`` (1:1, the default: the fewest tokens for an image with no usable content, and the
grid LLaVA-NeXT's rule gives) or ``closest_ratio`` (the candidate whose m/n is nearest w/h in
log space; ties -> fewer tiles). The ablation job counts these images (``degenerate_many``).
Sizes <= 0 (or above 2**31 - 1) are bad input: InputError.

InternVL candidate order within an equal tile count [choice]: i ascending. InternVL builds the
list from a Python set, whose order is an implementation detail; with min_tiles = 1 and
max_tiles <= 40 no two candidates of equal i*j are neighbours in aspect ratio, so they can
never tie and the order never changes a result.
"""
from __future__ import annotations

import math

import numpy as np

from bluelm_v import hookimpl
from bluelm_v.errors import InputError
from bluelm_v.types import Crops, Grid

MAX_SIDE = 2**31 - 1
CHUNK = 16384  # sizes per vectorised step
THUMBNAILS = ("first", "last", "auto", "none")
FALLBACKS = ("smallest", "closest_ratio")


def check_size(width, height) -> tuple[int, int]:
    """(w, h) as ints; InputError for sizes that are not positive integers <= 2**31 - 1."""
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        raise InputError(f"image size ({width!r}, {height!r}): not integers") from None
    if w != width or h != height or not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise InputError(f"image size {width}x{height}: width and height must be integers in [1, {MAX_SIDE}]")
    return w, h


def check_sizes(widths, heights) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of sizes as int64; InputError naming the first bad index."""
    w = np.asarray(widths)
    h = np.asarray(heights)
    if w.shape != h.shape or w.ndim != 1:
        raise InputError(f"sizes: widths {w.shape} and heights {h.shape} must be 1-D of equal length")
    wi, hi = w.astype(np.int64), h.astype(np.int64)
    bad = (wi != w) | (hi != h) | (wi < 1) | (hi < 1) | (wi > MAX_SIDE) | (hi > MAX_SIDE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"sizes[{i}] = {w[i]}x{h[i]}: width and height must be integers in [1, {MAX_SIDE}] "
                         f"({int(bad.sum())} bad sizes)")
    return wi, hi


def fit_scalar(w: int, h: int, canvas_w: int, canvas_h: int) -> tuple[int, int]:
    """docs/design.md §2.1: effective resolution Re and wasted resolution Rw of one canvas."""
    s = min(canvas_w / w, canvas_h / h)
    effective = min(math.floor(w * s) * math.floor(h * s), w * h)
    return effective, canvas_w * canvas_h - effective


def side_terms(wf: np.ndarray, hf: np.ndarray, area: np.ndarray, tile_size: int, max_side: int):
    """Per canvas side k*B (k = 1..max_side): the scale when the width limits, sw[k] = kB / w,
    and the Re it gives, pw[k]; likewise sh[k], ph[k] when the height limits. A canvas (m, n)
    then has s = min(sw[m], sh[n]) and Re = pw[m] if sw[m] <= sh[n] else ph[n]: the same float64
    operations as fit_scalar, computed once per side instead of once per canvas."""
    sw, pw, sh, ph = {}, {}, {}, {}
    for k in range(1, max_side + 1):
        side = k * tile_size
        sw[k] = side / wf
        pw[k] = np.minimum(np.floor(wf * sw[k]) * np.floor(hf * sw[k]), area)
        sh[k] = side / hf
        ph[k] = np.minimum(np.floor(wf * sh[k]) * np.floor(hf * sh[k]), area)
    return sw, pw, sh, ph


def canvas_effective(terms, m: int, n: int) -> np.ndarray:
    """Re of canvas (m, n) for every size, as float64 holding exact integers."""
    sw, pw, sh, ph = terms
    return np.where(sw[m] <= sh[n], pw[m], ph[n])


class Tiler:
    """Shared parts: thumbnail policy, crop counting, tiling a canvas into normalised crops."""

    def __init__(self, tile_size: int = 384, thumbnail: str = "first"):
        if thumbnail not in THUMBNAILS:
            raise ValueError(f"thumbnail must be one of {THUMBNAILS}, got {thumbnail!r}")
        self.tile_size = int(tile_size)
        self.thumbnail = thumbnail

    # -- selection (subclasses implement _select / _select_many) -------------------------
    def select(self, width, height) -> tuple[int, int]:
        return self._select(*check_size(width, height))

    def select_many(self, widths, heights) -> tuple[np.ndarray, np.ndarray]:
        w, h = check_sizes(widths, heights)
        ms, ns = np.empty(len(w), np.int32), np.empty(len(w), np.int32)
        for a in range(0, len(w), CHUNK):  # chunks keep the temporaries in cache
            wc, hc = w[a:a + CHUNK], h[a:a + CHUNK]
            ms[a:a + CHUNK], ns[a:a + CHUNK] = self._select_many(wc, hc)
        return ms, ns

    def degenerate_many(self, widths, heights) -> np.ndarray:
        """True where no candidate canvas holds a scaled image of at least 1 px per side."""
        w, h = check_sizes(widths, heights)
        return np.zeros(len(w), dtype=bool)

    def num_crops(self, m, n):
        tiles = m * n
        if self.thumbnail == "none":
            return tiles
        if self.thumbnail == "auto":
            return tiles + (tiles > 1) * 1
        return tiles + 1

    # -- transform -----------------------------------------------------------------------
    def transform(self, image) -> Crops:
        """PIL image (or HWC uint8 array) -> Crops with pixels [K, 3, B, B] in [-1, 1]."""
        import torch  # lazily: selection alone never needs torch
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        m, n = self.select(w, h)
        B = self.tile_size
        canvas = np.asarray(self.canvas(image, m, n), dtype=np.uint8)            # [n*B, m*B, 3]
        tiles = canvas.reshape(n, B, m, B, 3).transpose(0, 2, 4, 1, 3).reshape(n * m, 3, B, B)  # row-major
        parts, thumb_at = [tiles], None
        if self.thumbnail != "none" and not (self.thumbnail == "auto" and m * n == 1):
            thumb = np.asarray(image.resize((B, B), Image.BICUBIC), dtype=np.uint8).transpose(2, 0, 1)[None]
            thumb_at = 0 if self.thumbnail == "first" else m * n
            parts = [thumb, tiles] if thumb_at == 0 else [tiles, thumb]
        pixels = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))  # [K, 3, B, B] uint8
        pixels = pixels.float().div_(127.5).sub_(1.0)                            # (x/255 - 0.5) / 0.5
        return Crops(pixels=pixels, grid=Grid(m, n), n_crops=int(pixels.shape[0]),
                     thumbnail_index=thumb_at, image_size=(w, h))

    def canvas(self, image, m: int, n: int):
        """The (m*B) x (n*B) image that is cut into tiles."""
        raise NotImplementedError


class PaddedCanvasTiler(Tiler):
    """Aspect-preserving resize so the limiting side fills the canvas, centred on black."""

    def canvas(self, image, m, n):
        from PIL import Image

        w, h = image.size
        cw, ch = m * self.tile_size, n * self.tile_size
        if cw / w <= ch / h:  # the width limits
            new_w, new_h = cw, min(max(1, math.ceil(h * cw / w)), ch)
        else:
            new_w, new_h = min(max(1, math.ceil(w * ch / h)), cw), ch
        out = Image.new("RGB", (cw, ch), (0, 0, 0))
        out.paste(image.resize((new_w, new_h), Image.BICUBIC), ((cw - new_w) // 2, (ch - new_h) // 2))
        return out


class LlavaNextTiler(PaddedCanvasTiler):
    """LLaVA-NeXT anyres (docs/design.md §2.1): largest effective resolution, then least waste."""

    def __init__(self, tile_size: int = 384, max_grid: int = 3, thumbnail: str = "first"):
        super().__init__(tile_size, thumbnail)
        self.max_grid = int(max_grid)
        # (1,1),(1,2),...,(1,G),(2,1),...,(G,G)
        self.candidates = [(m, n) for m in range(1, self.max_grid + 1) for n in range(1, self.max_grid + 1)]

    def _select(self, w, h):
        best, best_re, best_rw = None, 0, math.inf
        for m, n in self.candidates:
            re, rw = fit_scalar(w, h, m * self.tile_size, n * self.tile_size)
            if re > best_re or (re == best_re and rw < best_rw):
                best, best_re, best_rw = (m, n), re, rw
        return best

    def _select_many(self, w, h):
        # Lexicographic best (largest Re, then smallest canvas = smallest Rw, then earliest) as
        # one exact integer score per candidate: Re * K + preference (K - 1 - rank).
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        terms = side_terms(wf, hf, wf * hf, self.tile_size, self.max_grid)
        K = len(self.candidates)
        rank = sorted(range(K), key=lambda k: (self.candidates[k][0] * self.candidates[k][1], k))
        best_k, best_score = np.zeros(len(w), np.int16), np.full(len(w), -1.0)
        for k, (m, n) in enumerate(self.candidates):
            score = canvas_effective(terms, m, n) * K + (K - 1 - rank.index(k))
            np.copyto(best_k, k, where=score > best_score)
            np.maximum(best_score, score, out=best_score)
        grid = np.array(self.candidates, np.int64)
        return grid[best_k, 0], grid[best_k, 1]

    def degenerate_many(self, widths, heights):
        w, h = check_sizes(widths, heights)
        G = self.max_grid * self.tile_size  # the largest canvas has the largest Re of all
        s = np.minimum(G / w.astype(np.float64), G / h.astype(np.float64))
        return (np.floor(w * s) == 0) | (np.floor(h * s) == 0)


class RelaxedTiler(LlavaNextTiler):
    """BlueLM-V-3B relaxed aspect-ratio matching (docs/design.md §2.3, Algorithm 1), candidates descending."""

    def __init__(self, tile_size: int = 384, max_grid: int = 3, alpha: float = 0.1,
                 thumbnail: str = "first", fallback: str = "smallest"):
        super().__init__(tile_size, max_grid, thumbnail)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.alpha, self.fallback = float(alpha), fallback
        self.candidates = self.candidates[::-1]  # (G,G) first, (1,1) last

    def _select(self, w, h):
        best, re_max, rw_min = None, 0, math.inf
        for m, n in self.candidates:
            re, rw = fit_scalar(w, h, m * self.tile_size, n * self.tile_size)
            if (re - re_max) > self.alpha * re_max or ((re_max - re) < self.alpha * re_max and rw < rw_min):
                best, re_max, rw_min = (m, n), re, rw
        return best if best is not None else self._fallback_scalar(w, h)

    def _select_many(self, w, h):
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        terms = side_terms(wf, hf, wf * hf, self.tile_size, self.max_grid)
        best_k = np.full(len(w), -1, np.int16)
        re_max, rw_min = np.zeros(len(w)), np.full(len(w), np.inf)
        for k, (m, n) in enumerate(self.candidates):
            re = canvas_effective(terms, m, n)
            rw = (m * n * self.tile_size * self.tile_size) - re
            slack = self.alpha * re_max
            take = ((re - re_max) > slack) | (((re_max - re) < slack) & (rw < rw_min))
            np.copyto(best_k, k, where=take)
            np.copyto(re_max, re, where=take)
            np.copyto(rw_min, rw, where=take)
        grid = np.array(self.candidates + [(0, 0)], np.int64)  # index -1: nothing accepted
        best_m, best_n = grid[best_k, 0], grid[best_k, 1]
        none = best_k < 0
        if none.any():
            fb = [self._fallback_scalar(int(a), int(b)) for a, b in zip(w[none], h[none])]
            best_m[none], best_n[none] = [g[0] for g in fb], [g[1] for g in fb]
        return best_m, best_n

    def _fallback_scalar(self, w, h):
        if self.fallback == "smallest":
            return (1, 1)
        target = math.log(w / h)
        return min(sorted(self.candidates, key=lambda g: (g[0] * g[1], g)),
                   key=lambda g: abs(math.log(g[0] / g[1]) - target))


class InternVLTiler(Tiler):
    """InternVL 1.5 dynamic tiling (docs/design.md §2.2): closest aspect ratio, tiles stretched, no padding."""

    def __init__(self, tile_size: int = 384, min_tiles: int = 1, max_tiles: int = 9, thumbnail: str = "auto"):
        super().__init__(tile_size, thumbnail)
        if min_tiles > max_tiles:
            raise ValueError(f"min_tiles ({min_tiles}) must be <= max_tiles ({max_tiles})")
        self.min_tiles, self.max_tiles = int(min_tiles), int(max_tiles)
        pairs = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)
                 if min_tiles <= i * j <= max_tiles]
        self.candidates = sorted(pairs, key=lambda g: (g[0] * g[1], g[0]))
        # For select_many: the distinct ratios, and per ratio its candidates in list order.
        groups: dict[float, list[int]] = {}
        for k, (i, j) in enumerate(self.candidates):
            groups.setdefault(i / j, []).append(k)
        self._ratios = np.array(sorted(groups))
        width = max(len(g) for g in groups.values())
        self._members = np.array([groups[r] + groups[r][-1:] * (width - len(groups[r])) for r in sorted(groups)])
        self._later_thresholds = np.array([[self._threshold(*self.candidates[k]) for k in groups[r][1:]]
                                           + [np.inf] * (width - len(groups[r])) for r in sorted(groups)])

    def _threshold(self, i, j) -> float:
        return 0.5 * self.tile_size * self.tile_size * i * j

    def _select(self, w, h):
        aspect, area = w / h, w * h
        best, best_diff = (1, 1), math.inf
        for i, j in self.candidates:
            diff = abs(aspect - i / j)
            if diff < best_diff:
                best, best_diff = (i, j), diff
            elif diff == best_diff and area > self._threshold(i, j):
                best = (i, j)
        return best

    def _select_many(self, w, h):
        """The scan above, solved per size without scanning: |aspect - r| only shrinks towards
        aspect, and distinct ratios are >= 1/max_tiles^2 apart (far above float rounding), so
        the minimum is at one of the two ratios around aspect. Within that ratio's candidates
        (list order, thresholds increasing) the scan ends on the last one whose threshold the
        area exceeds. Exact ties between the two neighbours (e.g. 640x512: 1.25 lies midway
        between 1 and 1.5) take the full scan."""
        aspect, area = w.astype(np.float64) / h.astype(np.float64), w * h
        ratios = self._ratios
        right = np.searchsorted(ratios, aspect)                       # ratios[right-1] < aspect <= ratios[right]
        lo, hi = np.maximum(right - 1, 0), np.minimum(right, len(ratios) - 1)
        d_lo, d_hi = np.abs(aspect - ratios[lo]), np.abs(aspect - ratios[hi])
        group = np.where(d_hi < d_lo, hi, lo)
        later = np.zeros(len(w), np.int64)
        for c in range(self._later_thresholds.shape[1]):
            later += self._later_thresholds[group, c] < area
        k = self._members[group, later]
        tie = np.flatnonzero((d_lo == d_hi) & (lo != hi))
        if len(tie):
            k[tie] = self._scan_many(aspect[tie], area[tie])
        grid = np.array(self.candidates, np.int64)
        return grid[k, 0], grid[k, 1]

    def _scan_many(self, aspect, area):
        """The rule as written, vectorised over sizes: one pass over the candidates."""
        best_k, best_diff = np.zeros(len(aspect), np.int64), np.full(len(aspect), np.inf)
        for k, (i, j) in enumerate(self.candidates):
            diff = np.abs(aspect - i / j)
            take = (diff < best_diff) | ((diff == best_diff) & (area > self._threshold(i, j)))
            best_k[take] = k
            np.minimum(best_diff, diff, out=best_diff)
        return best_k

    def canvas(self, image, m, n):
        from PIL import Image

        return image.resize((m * self.tile_size, n * self.tile_size), Image.BICUBIC)


class SingleTiler(Tiler):
    """One B x B crop, no tiling (stage-1 training): the image squashed, or padded to a square."""

    def __init__(self, tile_size: int = 384, mode: str = "squash"):
        super().__init__(tile_size, "none")
        if mode not in ("squash", "pad"):
            raise ValueError(f"mode must be 'squash' or 'pad', got {mode!r}")
        self.mode = mode

    def _select(self, w, h):
        return (1, 1)

    def _select_many(self, w, h):
        return np.ones(len(w), np.int64), np.ones(len(w), np.int64)

    def canvas(self, image, m, n):
        if self.mode == "pad":
            return PaddedCanvasTiler.canvas(self, image, m, n)
        from PIL import Image

        return image.resize((self.tile_size, self.tile_size), Image.BICUBIC)


_COMMON_RANGES = {"tile_size": (14, 4096)}


@hookimpl
def bluelm_v_register(registry):
    registry.tiler.register(
        "relaxed", RelaxedTiler,
        description="BlueLM-V-3B relaxed aspect-ratio matching (alpha threshold, candidates descending)",
        ranges={**_COMMON_RANGES, "max_grid": (1, 12), "alpha": (0.0, 1.0)},
        choices={"thumbnail": THUMBNAILS, "fallback": FALLBACKS})
    registry.tiler.register(
        "llava_next", LlavaNextTiler,
        description="LLaVA-NeXT anyres: max effective resolution, then min waste; padded canvas",
        ranges={**_COMMON_RANGES, "max_grid": (1, 12)}, choices={"thumbnail": THUMBNAILS})
    registry.tiler.register(
        "internvl", InternVLTiler,
        description="InternVL 1.5 dynamic tiling: closest aspect ratio, stretched, thumbnail last",
        ranges={**_COMMON_RANGES, "min_tiles": (1, 144), "max_tiles": (1, 144)},
        choices={"thumbnail": THUMBNAILS})
    registry.tiler.register(
        "single", SingleTiler, description="one tile, no tiling (stage-1 pretraining resolution)",
        ranges=_COMMON_RANGES, choices={"mode": ("squash", "pad")})
