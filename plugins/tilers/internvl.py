"""InternVL dynamic tiling (docs/design.md §2.2, §5.4): closest aspect ratio, tiles stretched.

The rule is InternVL's ``dynamic_preprocess`` / ``find_closest_aspect_ratio``: candidates
(i, j) with min_tiles <= i*j <= max_tiles (i columns, j rows), built as a Python set and
sorted by i*j (a stable sort, so equal products keep the set's iteration order, which this
module reproduces by building the set the same way); the smallest |w/h - i/j| wins, and a
later candidate with the same difference replaces it when the image area exceeds half of
its canvas (0.5 * B^2 * i * j). The image is stretched to (i*B, j*B) -- no padding -- and a
thumbnail (the image squashed to B x B) follows when there is more than one tile.

Tokens: crops x ``tokens_per_crop``: 196 in the BlueLM-V ablation (384-px tiles after the
2x2 merge); InternVL's own 448-px tiles give 256 (pixel shuffle 0.5 of 32 x 32).
"""
from __future__ import annotations

import math

import numpy as np

from .base import Tiler


class InternVLTiler(Tiler):
    """InternVL 1.5 dynamic tiling (docs/design.md §2.2): closest aspect ratio, stretched, no padding."""

    def __init__(self, tile_size: int = 384, min_tiles: int = 1, max_tiles: int = 9, thumbnail: str = "auto",
                 tokens_per_crop: int = 196):
        super().__init__(tile_size, thumbnail, tokens_per_crop)
        if min_tiles > max_tiles:
            raise ValueError(f"min_tiles ({min_tiles}) must be <= max_tiles ({max_tiles})")
        self.min_tiles, self.max_tiles = int(min_tiles), int(max_tiles)
        lo, hi = self.min_tiles, self.max_tiles
        pairs = set((i, j) for k in range(lo, hi + 1) for i in range(1, k + 1) for j in range(1, k + 1)
                    if lo <= i * j <= hi)
        self.candidates = sorted(pairs, key=lambda g: g[0] * g[1])
        # For _grid_many: the distinct ratios, and per ratio its candidates in list order.
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

    def _grid_scalar(self, w, h):
        aspect, area = w / h, w * h
        best, best_diff = (1, 1), math.inf
        for i, j in self.candidates:
            diff = abs(aspect - i / j)
            if diff < best_diff:
                best, best_diff = (i, j), diff
            elif diff == best_diff and area > self._threshold(i, j):
                best = (i, j)
        return best

    def _grid_many(self, w, h):
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

    def reference(self, w, h):
        m, n = self._grid_scalar(w, h)
        crops, B = self.num_crops(m, n), self.tile_size
        return {"m": m, "n": n, "crops": crops, "tokens": crops * self.tokens_per_crop,
                "pixels": m * n * B * B, "encoder_pixels": crops * B * B}

    def _decide(self, w, h):
        m, n = self._grid_many(w, h)
        crops, B = self.num_crops(m, n), self.tile_size
        return {"m": m, "n": n, "crops": crops, "tokens": crops * self.tokens_per_crop,
                "pixels": (m * n) * float(B * B), "encoder_pixels": crops * float(B * B)}

    def canvas(self, image, m, n):
        from PIL import Image

        return image.resize((m * self.tile_size, n * self.tile_size), Image.BICUBIC)
