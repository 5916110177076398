"""MiniCPM-V slicing (docs/design.md §5.6), as MiniCPM-V 2.5 / 2.6's image processor
(``slice_image``, ``get_sliced_grid``, ``find_best_resize``, ``get_refine_size``) does it.

    ratio = w*h / S^2 (S = ``scale_resolution``, 448); multiple = min(ceil(ratio), max_slice_nums)
    multiple <= 1: no slicing -- one source view, resized (up or down) to about S^2 pixels;
    else: slice counts {multiple-1, multiple, multiple+1} without 1 and above max_slice_nums,
          every factorisation [cols, rows] of each (cols ascending), the first with the least
          |log(w/h) - log(cols/rows)| wins; a source view of about S^2 pixels plus cols x rows
          slices of about S^2 pixels each.
    sides are rounded to multiples of the patch size (14) with Python's round, at least one patch.

Tokens: every view (the source and each slice) becomes ``queries`` tokens through the
resampler: 64 for MiniCPM-V 2.6 (``version`` 2.6), 96 for MiniCPM-Llama3-V 2.5 (``version``
2.5): queries x (1 + slices). Special tokens around views are not counted.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Tiler, ceil, py_round, trunc

QUERIES = {2.6: 64, 2.5: 96}


def ensure_divide(length, patch):
    return max(round(length / patch) * patch, patch)


def find_best_resize(width, height, scale, patch, allow_upscale=False):
    if (width * height > scale * scale) or allow_upscale:
        r = width / height
        height = int(scale / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def ensure_divide_many(length, patch):
    return np.maximum(py_round(length / patch) * patch, patch)


def find_best_resize_many(width, height, scale, patch, allow_upscale=False):
    """find_best_resize over float64 arrays (every size in the call takes the resize branch
    when allow_upscale; otherwise those above scale^2)."""
    r = width / height
    new_h = trunc(scale / np.sqrt(r)).astype(np.float64)
    new_w = trunc(new_h * r).astype(np.float64)
    if not allow_upscale:
        go = width * height > scale * scale
        new_w, new_h = np.where(go, new_w, width), np.where(go, new_h, height)
    return ensure_divide_many(new_w, patch), ensure_divide_many(new_h, patch)


class MiniCPMVTiler(Tiler):
    """MiniCPM-V slicing: up to 9 slices of ~448^2 px chosen by log aspect ratio + a source view."""

    crops_for_encoder = False

    def __init__(self, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14,
                 version: float = 2.6):
        if version not in QUERIES:
            raise ValueError(f"version must be one of {sorted(QUERIES)}, got {version!r}")
        super().__init__(scale_resolution, "first", QUERIES[version])
        self.max_slice_nums, self.scale, self.patch = int(max_slice_nums), int(scale_resolution), int(patch_size)
        self.version = version
        # Candidate grids per multiple (2 .. max_slice_nums), in the reference's order.
        self._grids = {k: self._candidate_grids(k) for k in range(2, self.max_slice_nums + 1)}

    def _candidate_grids(self, multiple):
        grids = []
        for count in (multiple - 1, multiple, multiple + 1):
            if count == 1 or count > self.max_slice_nums:
                continue
            grids += [[c, count // c] for c in range(1, count + 1) if count % c == 0]
        return grids

    def reference(self, w, h):
        S, P = self.scale, self.patch
        log_ratio = math.log(w / h)
        multiple = min(math.ceil(w * h / (S * S)), self.max_slice_nums)
        if multiple <= 1:
            bw, bh = find_best_resize(w, h, S, P, allow_upscale=True)
            return {"m": 1, "n": 1, "crops": 1, "tokens": self.tokens_per_crop, "pixels": bw * bh,
                    "encoder_pixels": bw * bh}
        best, least = [1, 1], math.inf
        for grid in self._grids[multiple]:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < least:
                best, least = grid, error
        sw, sh = find_best_resize(w, h, S, P)
        gx, gy = best
        cell_w, cell_h = find_best_resize(ensure_divide(w, gx) / gx, ensure_divide(h, gy) / gy, S, P, allow_upscale=True)
        slices = gx * gy
        return {"m": gx, "n": gy, "crops": 1 + slices, "tokens": self.tokens_per_crop * (1 + slices),
                "pixels": cell_w * gx * cell_h * gy, "encoder_pixels": sw * sh + cell_w * gx * cell_h * gy}

    def _decide(self, w, h):
        S, P = self.scale, self.patch
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        multiple = np.minimum(ceil(w * h / (S * S)), self.max_slice_nums)
        gx, gy = np.ones(len(w), np.int64), np.ones(len(w), np.int64)
        sliced = multiple > 1
        if sliced.any():
            log_ratio = np.log(wf / hf)  # may differ from math.log in the last bit: near ties re-done below
            near = np.zeros(len(w), bool)
            for k, grids in self._grids.items():
                rows = multiple == k
                if not rows.any():
                    continue
                logs = np.array([math.log(g[0] / g[1]) for g in grids])
                err = np.abs(log_ratio[rows, None] - logs[None, :])               # [N_k, C]
                pick = np.argmin(err, axis=1)                                     # first minimum wins
                part = np.sort(err, axis=1)
                near[rows] = part[:, 1] - part[:, 0] < 1e-9 if len(grids) > 1 else False
                table = np.array(grids, np.int64)
                gx[rows], gy[rows] = table[pick, 0], table[pick, 1]
            for i in np.flatnonzero(near):
                d = self.reference(int(w[i]), int(h[i]))
                gx[i], gy[i] = d["m"], d["n"]
        bw, bh = find_best_resize_many(wf, hf, S, P, allow_upscale=True)          # unsliced source view
        sw, sh = find_best_resize_many(wf, hf, S, P)                              # sliced: source view
        cell_w, cell_h = find_best_resize_many(ensure_divide_many(wf, gx) / gx, ensure_divide_many(hf, gy) / gy,
                                               S, P, allow_upscale=True)
        slices = gx * gy
        refine = (cell_w * gx * cell_h * gy).astype(np.float64)
        unsliced = (bw * bh).astype(np.float64)
        return {"m": gx, "n": gy, "crops": np.where(sliced, 1 + slices, 1),
                "tokens": self.tokens_per_crop * np.where(sliced, 1 + slices, 1),
                "pixels": np.where(sliced, refine, unsliced),
                "encoder_pixels": np.where(sliced, sw * sh + refine, unsliced)}

    def transform(self, image):
        self.refuse_transform("its slices are not B x B crops for this model's encoder")
