"""The anyres family: LLaVA-NeXT (docs/design.md §2.1, §5.2), BlueLM-V-3B's relaxed matching
(§2.3) and LLaVA-OneVision's anyres_max (§5.3). A grid (m, n) is a canvas of m x n tiles
of B px; the image is resized into it keeping its aspect ratio and centred on padding.

Candidate order: ``max_grid`` G gives (1,1), (1,2), ..., (1,G), (2,1), ..., (G,G) -- the
first number is the WIDTH in tiles and is the outer loop, as LLaVA-NeXT's repository reads
its pinpoints (width, height). ``pinpoints`` (a list of [width_px, height_px], multiples of
B) replaces that list, in the order given.

Tokens: ``unpad=False`` -> crops x ``tokens_per_crop`` (today's ablation: 196 per crop,
thumbnail included). ``unpad=True`` -> the LLaVA-NeXT feature count: a base view of P^2
tokens (P = B // patch_size: 27 for SigLIP's 384 px in 14-px patches), plus the canvas feature map (n*P rows x m*P columns) with the
padding rows or columns removed (LLaVA-NeXT's unpad_image, int() truncation as in its
repository), reduced by ``anyres_max`` when set (OneVision: t = sqrt(h*w / (K * P^2)),
applied when t > 1.1: h' = int(h // t), w' = int(w // t)), and one newline token per row:
P^2 + h'*w' + h'.

Degenerate sizes: for an extreme strip (1 x 10000 px) every candidate canvas scales the short
side below one pixel, so every effective resolution Re is 0. LLaVA-NeXT's rule (largest Re,
then smallest waste) still defines a grid there: the smallest canvas, 1:1. ``relaxed``
(Algorithm 1) accepts no candidate; it then returns its ``fallback`` grid [choice]:
``smallest`` (1:1, the default: the fewest tokens for an image with no usable content, and the
grid LLaVA-NeXT's rule gives) or ``closest_ratio`` (the candidate whose m/n is nearest w/h in
log space; ties -> fewer tiles). The ablation job counts these images (``degenerate_many``).
"""
from __future__ import annotations

import math

import numpy as np

from .base import PaddedCanvasTiler, check_sizes, padded_resize

FALLBACKS = ("smallest", "closest_ratio")


def fit_scalar(w: int, h: int, canvas_w: int, canvas_h: int) -> tuple[int, int]:
    """docs/design.md §2.1: effective resolution Re and wasted resolution Rw of one canvas."""
    s = min(canvas_w / w, canvas_h / h)
    effective = min(math.floor(w * s) * math.floor(h * s), w * h)
    return effective, canvas_w * canvas_h - effective


def side_terms(wf: np.ndarray, hf: np.ndarray, area: np.ndarray, tile_size: int, sides):
    """Per canvas side k*B: the scale when the width limits, sw[k] = kB / w, and the Re it
    gives, pw[k]; likewise sh[k], ph[k] when the height limits. A canvas (m, n) then has
    s = min(sw[m], sh[n]) and Re = pw[m] if sw[m] <= sh[n] else ph[n]: the same float64
    operations as fit_scalar, computed once per side instead of once per canvas."""
    sw, pw, sh, ph = {}, {}, {}, {}
    for k in sides:
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


def unpad_scalar(w: int, h: int, m: int, n: int, P: int, anyres_max: int) -> tuple[int, int]:
    """(rows, columns) of the unpadded (and anyres_max-reduced) feature map."""
    cur_h, cur_w = n * P, m * P
    if w / h > cur_w / cur_h:
        new_h = int(h * (cur_w / w))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(w * (cur_h / h))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    if anyres_max:
        times = math.sqrt(cur_h * cur_w / (anyres_max * P**2))
        if times > 1.1:
            cur_h, cur_w = int(cur_h // times), int(cur_w // times)
    return cur_h, cur_w


def unpad_many(w, h, m, n, P: int, anyres_max: int):
    """unpad_scalar over arrays (w, h float64; m, n int64)."""
    cur_h, cur_w = n * P, m * P
    wide = w / h > cur_w / cur_h
    new_h = np.trunc(h * (cur_w / w)).astype(np.int64)
    new_w = np.trunc(w * (cur_h / h)).astype(np.int64)
    rows = np.where(wide, cur_h - 2 * ((cur_h - new_h) // 2), cur_h)
    cols = np.where(wide, cur_w, cur_w - 2 * ((cur_w - new_w) // 2))
    if anyres_max:
        times = np.sqrt(rows * cols / (anyres_max * P**2))
        big = times > 1.1
        t = np.where(big, times, 1.0)
        rows = np.where(big, np.floor_divide(rows, t), rows).astype(np.int64)
        cols = np.where(big, np.floor_divide(cols, t), cols).astype(np.int64)
    return rows, cols


class LlavaNextTiler(PaddedCanvasTiler):
    """LLaVA-NeXT anyres (docs/design.md §2.1): largest effective resolution, then least waste."""

    def __init__(self, tile_size: int = 384, max_grid: int = 3, thumbnail: str = "first",
                 pinpoints: list | None = None, tokens_per_crop: int = 196, unpad: bool = False,
                 patch_size: int = 14, anyres_max: int = 0):
        super().__init__(tile_size, thumbnail, tokens_per_crop)
        self.max_grid, self.unpad = int(max_grid), bool(unpad)
        self.patch_size, self.anyres_max = int(patch_size), int(anyres_max)
        if pinpoints:
            bad = [p for p in pinpoints if len(p) != 2 or p[0] % self.tile_size or p[1] % self.tile_size
                   or p[0] <= 0 or p[1] <= 0]
            if bad:
                raise ValueError(f"pinpoints must be [width, height] pairs of positive multiples of "
                                 f"tile_size {self.tile_size}, got {bad[0]}")
            self.candidates = [(int(p[0]) // self.tile_size, int(p[1]) // self.tile_size) for p in pinpoints]
        else:
            G = self.max_grid
            self.candidates = [(m, n) for m in range(1, G + 1) for n in range(1, G + 1)]

    # -- the grid ---------------------------------------------------------------------------
    def _grid_scalar(self, w, h):
        best, best_re, best_rw = None, 0, math.inf
        for m, n in self.candidates:
            re, rw = fit_scalar(w, h, m * self.tile_size, n * self.tile_size)
            if re > best_re or (re == best_re and rw < best_rw):
                best, best_re, best_rw = (m, n), re, rw
        return best

    def _grid_many(self, w, h):
        # Lexicographic best (largest Re, then smallest canvas = smallest Rw, then earliest) as
        # one exact integer score per candidate: Re * K + preference (K - 1 - rank).
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        sides = sorted({k for c in self.candidates for k in c})
        terms = side_terms(wf, hf, wf * hf, self.tile_size, sides)
        K = len(self.candidates)
        rank = sorted(range(K), key=lambda k: (self.candidates[k][0] * self.candidates[k][1], k))
        best_k, best_score = np.zeros(len(w), np.int16), np.full(len(w), -1.0)
        for k, (m, n) in enumerate(self.candidates):
            score = canvas_effective(terms, m, n) * K + (K - 1 - rank.index(k))
            np.copyto(best_k, k, where=score > best_score)
            np.maximum(best_score, score, out=best_score)
        grid = np.array(self.candidates, np.int64)
        return grid[best_k, 0], grid[best_k, 1]

    # -- one decision -----------------------------------------------------------------------
    def reference(self, w, h):
        m, n = self._grid_scalar(w, h)
        B, crops = self.tile_size, self.num_crops(m, n)
        if self.unpad:
            P = B // self.patch_size
            rows, cols = unpad_scalar(w, h, m, n, P, self.anyres_max)
            tokens = P * P + rows * cols + rows
        else:
            tokens = crops * self.tokens_per_crop
        new_w, new_h = padded_resize(w, h, m * B, n * B)
        return {"m": m, "n": n, "crops": crops, "tokens": tokens, "pixels": new_w * new_h,
                "encoder_pixels": crops * B * B}

    def _decide(self, w, h):
        m, n = self._grid_many(w, h)
        B, crops = self.tile_size, self.num_crops(m, n)
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        if self.unpad:
            P = B // self.patch_size
            rows, cols = unpad_many(wf, hf, m, n, P, self.anyres_max)
            tokens = P * P + rows * cols + rows
        else:
            tokens = crops * self.tokens_per_crop
        new_w, new_h = padded_resize(wf, hf, m * B, n * B)
        return {"m": m, "n": n, "crops": crops, "tokens": tokens, "pixels": new_w * new_h.astype(np.float64),
                "encoder_pixels": crops * float(B * B)}

    def degenerate_many(self, widths, heights):
        w, h = check_sizes(widths, heights)
        G = max(max(c) for c in self.candidates) * self.tile_size  # a canvas at least this large holds the most
        s = np.minimum(G / w.astype(np.float64), G / h.astype(np.float64))
        return (np.floor(w * s) == 0) | (np.floor(h * s) == 0)


class LlavaOneVisionTiler(LlavaNextTiler):
    """LLaVA-OneVision anyres_max_9 (docs/design.md §5.3): 36 pinpoints up to 6x6 tiles of 384,
    unpad, feature map reduced to about 9 tiles' worth, a newline per row, a 729-token base."""

    def __init__(self, tile_size: int = 384, max_grid: int = 6, anyres_max: int = 9, patch_size: int = 14,
                 thumbnail: str = "first"):
        super().__init__(tile_size, max_grid, thumbnail, None, (tile_size // patch_size) ** 2, True,
                         patch_size, anyres_max)


class RelaxedTiler(LlavaNextTiler):
    """BlueLM-V-3B relaxed aspect-ratio matching (docs/design.md §2.3, Algorithm 1), candidates descending."""

    def __init__(self, tile_size: int = 384, max_grid: int = 3, alpha: float = 0.1,
                 thumbnail: str = "first", fallback: str = "smallest", tokens_per_crop: int = 196):
        super().__init__(tile_size, max_grid, thumbnail, tokens_per_crop=tokens_per_crop)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.alpha, self.fallback = float(alpha), fallback
        self.candidates = self.candidates[::-1]  # (G,G) first, (1,1) last

    def _grid_scalar(self, w, h):
        best, re_max, rw_min = None, 0, math.inf
        for m, n in self.candidates:
            re, rw = fit_scalar(w, h, m * self.tile_size, n * self.tile_size)
            if (re - re_max) > self.alpha * re_max or ((re_max - re) < self.alpha * re_max and rw < rw_min):
                best, re_max, rw_min = (m, n), re, rw
        return best if best is not None else self._fallback_scalar(w, h)

    def _grid_many(self, w, h):
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        terms = side_terms(wf, hf, wf * hf, self.tile_size, range(1, self.max_grid + 1))
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
