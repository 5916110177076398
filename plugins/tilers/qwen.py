"""Qwen2-VL / Qwen3-VL native resolution (docs/design.md §5.5): no tiles, the whole image
resized by ``smart_resize`` as transformers 5.x's Qwen2VLImageProcessor does it.

    sides rounded to the nearest multiple of ``factor`` (Python's round: half to even;
    a side under factor/2 rounds to 0 -- transformers, unlike qwen-vl-utils, does not clamp
    it to ``factor`` here);
    area above max_pixels: beta = sqrt(h*w / max_pixels), sides floor(side / beta / factor)
    * factor, at least ``factor``;
    area below min_pixels: beta = sqrt(min_pixels / (h*w)), sides ceil(side * beta /
    factor) * factor.

An aspect ratio above 200 is a ValueError in the reference: such sizes are skipped with the
reason ``aspect_ratio_over_200``. Tokens: (h'/factor) * (w'/factor) (14-px patches merged
2x2 for Qwen2-VL: factor 28; 16-px patches merged 2x2 for Qwen3-VL: factor 32).
"""
from __future__ import annotations

import math

import numpy as np

from .base import Tiler, ceil, py_round

ASPECT_SKIP = "aspect_ratio_over_200"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h', w') for one size; ValueError for an aspect ratio above 200, as the reference."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLTiler(Tiler):
    """Qwen2-VL smart_resize: one variable-size view, (h'/28)(w'/28) tokens, no tiles."""

    crops_for_encoder = False

    has_grid = False
    skip_reason = ASPECT_SKIP

    def __init__(self, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12_845_056):
        super().__init__(factor, "none", 0)
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels ({min_pixels}) <= max_pixels ({max_pixels})")
        self.factor, self.min_pixels, self.max_pixels = int(factor), int(min_pixels), int(max_pixels)

    def resized_many(self, w: np.ndarray, h: np.ndarray):
        """(w', h', skipped) over arrays: smart_resize vectorised (same float64 operations)."""
        f = self.factor
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        skipped = np.maximum(wf, hf) / np.minimum(wf, hf) > 200
        h_bar, w_bar = py_round(hf / f) * f, py_round(wf / f) * f
        area = w * h
        big, small = h_bar * w_bar > self.max_pixels, h_bar * w_bar < self.min_pixels
        beta = np.sqrt(area / self.max_pixels)
        h_big = np.maximum(f, np.floor(hf / beta / f).astype(np.int64) * f)
        w_big = np.maximum(f, np.floor(wf / beta / f).astype(np.int64) * f)
        beta = np.sqrt(self.min_pixels / area)
        h_small, w_small = ceil(hf * beta / f) * f, ceil(wf * beta / f) * f
        h_bar = np.where(big, h_big, np.where(small, h_small, h_bar))
        w_bar = np.where(big, w_big, np.where(small, w_small, w_bar))
        return w_bar, h_bar, skipped

    def reference(self, w, h):
        try:
            h_bar, w_bar = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        except ValueError:
            return {"m": 0, "n": 0, "crops": 0, "tokens": -1, "pixels": 0, "encoder_pixels": 0, "skip": ASPECT_SKIP}
        return {"m": 1, "n": 1, "crops": 1, "tokens": (h_bar // self.factor) * (w_bar // self.factor),
                "pixels": h_bar * w_bar, "encoder_pixels": h_bar * w_bar}

    def _decide(self, w, h):
        w_bar, h_bar, skipped = self.resized_many(w, h)
        px = (w_bar * h_bar).astype(np.float64)
        return {"m": 1, "n": 1, "crops": 1, "tokens": (h_bar // self.factor) * (w_bar // self.factor),
                "pixels": px, "encoder_pixels": px, "skipped": skipped}

    def num_crops(self, m, n):
        return m * n  # one view

    def transform(self, image):
        self.refuse_transform("its one variable-size view is not a set of B x B crops for this model's encoder")


class Qwen3VLTiler(Qwen2VLTiler):
    """Qwen3-VL smart_resize: 16-px patches merged 2x2 (factor 32), (h'/32)(w'/32) tokens."""

    def __init__(self, factor: int = 32, min_pixels: int = 65_536, max_pixels: int = 16_777_216):
        super().__init__(factor, min_pixels, max_pixels)
