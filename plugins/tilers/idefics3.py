"""Idefics3 / SmolVLM image splitting (docs/design.md §5.7), as transformers 5.x's
Idefics3ImageProcessor (and SmolVLMImageProcessor, the same steps) preprocesses an image:

    1. the longest edge becomes L (``longest_edge``; upscaling too), the other side int()-scaled
       and made even (+1 when odd), at least 1 px;
    2. sides above 4096 (MAX_IMAGE_SIZE) are scaled down to it;
    3. both sides stretched up to whole tiles of T (``tile``): the longer side to ceil(side/T)*T,
       the other int()-scaled from it and rounded up to whole tiles;
    4. more than one tile: rows x cols tiles of T x T plus a global view (the image squashed
       to T x T) last; else one T x T view.

Tokens: ``per_view`` x (rows*cols + 1), or per_view for one view (image_seq_len: 169 for
Idefics3-8B's 364-px tiles, 81 for SmolVLM 2.2B's 384-px tiles, 64 for SmolVLM 256M/500M's
512-px tiles); the row/column marker tokens are not counted. Step 3 can give a side of 0 for
extreme strips (the reference then fails to resize): skipped as ``zero_side_after_resize``.
``variant`` picks the released settings; ``longest_edge`` (when set) overrides L.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Tiler, ceil, trunc

VARIANTS = {"idefics3": (1456, 364, 169), "smolvlm": (1536, 384, 81), "smolvlm_small": (2048, 512, 64)}
MAX_IMAGE_SIZE = 4096
ZERO_SKIP = "zero_side_after_resize"


def resized_scalar(w: int, h: int, L: int, T: int) -> tuple[int, int]:
    """(W, H) after steps 1-3 for one size."""
    aspect = w / h
    if w >= h:
        W, H = L, int(L / aspect)
        H += H % 2
    else:
        H, W = L, int(L * aspect)
        W += W % 2
    H, W = max(H, 1), max(W, 1)
    aspect = W / H
    if W >= H and W > MAX_IMAGE_SIZE:
        W, H = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif H > W and H > MAX_IMAGE_SIZE:
        H, W = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    H, W = max(H, 1), max(W, 1)
    aspect = W / H
    if W >= H:
        W = math.ceil(W / T) * T
        H = math.ceil(int(W / aspect) / T) * T
    else:
        H = math.ceil(H / T) * T
        W = math.ceil(int(H * aspect) / T) * T
    return W, H


def resized_many(w: np.ndarray, h: np.ndarray, L: int, T: int):
    """resized_scalar over int64 arrays (same float64 operations)."""
    wf, hf = w.astype(np.float64), h.astype(np.float64)
    aspect = wf / hf
    wide = w >= h
    H = np.where(wide, trunc(L / aspect), L)
    W = np.where(wide, L, trunc(L * aspect))
    H = np.where(wide, H + H % 2, H)
    W = np.where(wide, W, W + W % 2)
    H, W = np.maximum(H, 1), np.maximum(W, 1)
    aspect = W / H
    cap_w = (W >= H) & (W > MAX_IMAGE_SIZE)
    cap_h = ~cap_w & (H > W) & (H > MAX_IMAGE_SIZE)
    H = np.where(cap_w, trunc(MAX_IMAGE_SIZE / aspect), np.where(cap_h, MAX_IMAGE_SIZE, H))
    W = np.where(cap_w, MAX_IMAGE_SIZE, np.where(cap_h, trunc(MAX_IMAGE_SIZE * aspect), W))
    H, W = np.maximum(H, 1), np.maximum(W, 1)
    aspect = W / H
    wide = W >= H
    W_wide = ceil(W / T) * T
    H_tall = ceil(H / T) * T
    H_new = np.where(wide, ceil(trunc(W_wide / aspect) / T) * T, H_tall)
    W_new = np.where(wide, W_wide, ceil(trunc(H_tall * aspect) / T) * T)
    return W_new, H_new


class Idefics3Tiler(Tiler):
    """Idefics3 / SmolVLM: longest edge to L, stretched to whole T-px tiles, + a global view last."""

    skip_reason = ZERO_SKIP

    def __init__(self, variant: str = "idefics3", longest_edge: int | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        L, T, per_view = VARIANTS[variant]
        super().__init__(T, "auto", per_view)
        self.variant, self.longest_edge = variant, int(longest_edge or L)

    def reference(self, w, h):
        T = self.tile_size
        W, H = resized_scalar(w, h, self.longest_edge, T)
        if W == 0 or H == 0:
            return {"m": 0, "n": 0, "crops": 0, "tokens": -1, "pixels": 0, "encoder_pixels": 0, "skip": ZERO_SKIP}
        if H > T or W > T:
            cols, rows = math.ceil(W / T), math.ceil(H / T)
            views = rows * cols + 1
        else:
            cols = rows = views = 1
        return {"m": cols, "n": rows, "crops": views, "tokens": views * self.tokens_per_crop,
                "pixels": W * H, "encoder_pixels": views * T * T}

    def _decide(self, w, h):
        T = self.tile_size
        W, H = resized_many(w, h, self.longest_edge, T)
        cols, rows = np.maximum(ceil(W / T), 1), np.maximum(ceil(H / T), 1)
        views = np.where((H > T) | (W > T), rows * cols + 1, 1)
        zero = (W == 0) | (H == 0)
        return {"m": cols, "n": rows, "crops": views, "tokens": views * self.tokens_per_crop,
                "pixels": (W * H).astype(np.float64), "encoder_pixels": views * float(T * T),
                "skipped": zero}

    def canvas(self, image, m, n):
        from PIL import Image

        return image.resize((m * self.tile_size, n * self.tile_size), Image.BICUBIC)
