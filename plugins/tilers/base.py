"""What every built-in tiler shares: size checks, the per-size decision record, the public
methods built on one vectorised rule, and cutting a canvas into normalised crops.

A rule module implements two things (docs/design.md §5):

    reference(w, h) -> dict      the reference code restated for one size, line by line (the
                                 straightforward loop; ``select`` and the tests use it)
    _decide(w, h) -> dict        the same rule over int64 numpy arrays (one chunk of sizes)

Both return ``m, n`` (grid: m columns along the WIDTH, n rows), ``crops`` (views the encoder
sees, thumbnail / global view included), ``tokens`` (visual tokens the rule's own model feeds
its LLM), ``pixels`` (image-content pixels in the local views at the encoder's input: the
resized image without padding or thumbnail) and ``encoder_pixels`` (every pixel the encoder
processes, padding and global view included), and ``skip`` (a reason where the reference
rejects or crashes on the size, "" where it decides). Skipped sizes get m = n = crops = 0,
tokens = -1 and pixels = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bluelm_v.errors import InputError
from bluelm_v.types import Crops, Grid

MAX_SIDE = 2**31 - 1
CHUNK = 16384  # sizes per vectorised step: the temporaries stay in cache
THUMBNAILS = ("first", "last", "auto", "none")
FIELDS = ("m", "n", "crops", "tokens", "pixels", "encoder_pixels")


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


def py_round(x):
    """Python's round() (half to even) on float arrays, as int64."""
    return np.rint(x).astype(np.int64)


def trunc(x):
    """int() of positive floats, as int64."""
    return np.trunc(x).astype(np.int64)


def ceil(x):
    return np.ceil(x).astype(np.int64)


@dataclass
class Decisions:
    """One rule's answers for N sizes (numpy arrays of length N)."""

    m: np.ndarray               # int64 columns (0 where skipped)
    n: np.ndarray               # int64 rows
    crops: np.ndarray           # int64 views incl. thumbnail / global view
    tokens: np.ndarray          # int64 visual tokens (-1 where skipped)
    pixels: np.ndarray          # float64 image-content pixels in the local views
    encoder_pixels: np.ndarray  # float64 pixels the encoder processes
    skip_code: np.ndarray       # int8: 0 decided, k > 0: skipped for reasons[k - 1]
    reasons: tuple = ()

    def __len__(self) -> int:
        return len(self.m)

    @property
    def skipped(self) -> np.ndarray:
        return self.skip_code != 0

    @property
    def skip(self) -> np.ndarray:
        """The reason per size as an object array ("" where decided)."""
        return np.array(("",) + tuple(self.reasons), dtype=object)[self.skip_code]

    def take(self, index) -> "Decisions":
        return Decisions(*(getattr(self, f)[index] for f in (*FIELDS, "skip_code")), self.reasons)

    @classmethod
    def concat(cls, parts: list["Decisions"]) -> "Decisions":
        if not parts:
            return cls(*(np.zeros(0, np.int64) for _ in FIELDS[:4]), np.zeros(0), np.zeros(0), np.zeros(0, np.int8))
        if any(p.reasons != parts[0].reasons for p in parts):
            raise ValueError("Decisions.concat: parts with different skip reasons")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in (*FIELDS, "skip_code")), parts[0].reasons)


class Tiler:
    """Shared parts: the public API over ``_decide`` / ``reference``, thumbnails, transform.

    ``has_grid``: False for rules without a tile grid (Qwen's resize); their ``select``
    answers (1, 1), one view, and the ablation writes no m / n / crops columns for them."""

    has_grid = True
    crops_for_encoder = True   # False: a rule that decides sizes and tokens only (ablation, sweep); no transform
    skip_reason = ""  # the reason of the sizes ``_decide`` marks ``skipped`` (rules whose reference can fail)

    def __init__(self, tile_size: int = 384, thumbnail: str = "first", tokens_per_crop: int = 196):
        if thumbnail not in THUMBNAILS:
            raise ValueError(f"thumbnail must be one of {THUMBNAILS}, got {thumbnail!r}")
        self.tile_size = int(tile_size)
        self.thumbnail = thumbnail
        self.tokens_per_crop = int(tokens_per_crop)

    def refuse_transform(self, why: str):
        """The one-line error of a rule whose views this model's encoder cannot take."""
        from bluelm_v.errors import InputError

        raise InputError(f"tiler '{type(self).__name__}' decides sizes and visual tokens only (the tiling "
                         f"ablation and sweep): {why}")

    # -- subclasses --------------------------------------------------------------------------
    def reference(self, w: int, h: int) -> dict:
        raise NotImplementedError

    def _decide(self, w: np.ndarray, h: np.ndarray) -> dict:
        """The FIELDS as arrays (or scalars), and ``skipped``: a bool mask, for rules that skip."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    def decide(self, width, height) -> dict:
        """The reference rule for one size: m, n, crops, tokens, pixels, encoder_pixels, skip."""
        out = self.reference(*check_size(width, height))
        out.setdefault("skip", "")
        return out

    def decide_many(self, widths, heights) -> Decisions:
        """The rule over arrays of sizes (vectorised, identical to ``decide`` per size)."""
        w, h = check_sizes(widths, heights)
        N = len(w)
        cols = [np.empty(N, np.float64 if "pixels" in f else np.int64) for f in FIELDS]
        code = np.zeros(N, np.int8)
        for a in range(0, N, CHUNK):
            b = min(a + CHUNK, N)
            d = self._decide(w[a:b], h[a:b])
            for col, f in zip(cols, FIELDS):
                col[a:b] = d[f]
            if d.get("skipped") is not None:
                code[a:b] = d["skipped"]
        bad = code != 0
        if bad.any():
            for col, fill in zip(cols, (0, 0, 0, -1, 0, 0)):
                col[bad] = fill
        return Decisions(*cols, code, (self.skip_reason,) if self.skip_reason else ())

    def select(self, width, height) -> tuple[int, int]:
        d = self.decide(width, height)
        if d["skip"]:
            raise InputError(f"image size {width}x{height}: {type(self).__name__} cannot tile it ({d['skip']})")
        return int(d["m"]), int(d["n"])

    def select_many(self, widths, heights) -> tuple[np.ndarray, np.ndarray]:
        d = self.decide_many(widths, heights)
        return d.m, d.n

    def tokens(self, widths, heights):
        """Visual tokens the rule's own model feeds the LLM: an int for one size, an int64
        array for arrays (-1 where the reference rejects the size)."""
        if np.ndim(widths) == 0 and np.ndim(heights) == 0:
            return int(self.decide(widths, heights)["tokens"])
        return self.decide_many(widths, heights).tokens

    def skipped_many(self, widths, heights) -> np.ndarray:
        """The reason per size where the reference rejects it, "" where it decides."""
        return self.decide_many(widths, heights).skip

    def degenerate_many(self, widths, heights) -> np.ndarray:
        """Sizes no candidate canvas holds with at least one pixel a side (anyres rules)."""
        w, _ = check_sizes(widths, heights)
        return np.zeros(len(w), dtype=bool)

    def num_crops(self, m, n):
        tiles = m * n
        if self.thumbnail == "none":
            return tiles
        if self.thumbnail == "auto":
            return tiles + (tiles > 1) * 1
        return tiles + 1

    def grid_tokens(self, m, n):
        """tokens for grid-and-crop rules: crops x tokens per crop."""
        return self.num_crops(m, n) * self.tokens_per_crop

    # -- transform ---------------------------------------------------------------------------
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
            thumb = np.asarray(self.global_view(image), dtype=np.uint8).transpose(2, 0, 1)[None]
            thumb_at = 0 if self.thumbnail == "first" else m * n
            parts = [thumb, tiles] if thumb_at == 0 else [tiles, thumb]
        pixels = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))  # [K, 3, B, B] uint8
        pixels = pixels.float().div_(127.5).sub_(1.0)                            # (x/255 - 0.5) / 0.5
        return Crops(pixels=pixels, grid=Grid(m, n), n_crops=int(pixels.shape[0]),
                     thumbnail_index=thumb_at, image_size=(w, h))

    def global_view(self, image):
        from PIL import Image

        return image.resize((self.tile_size, self.tile_size), Image.BICUBIC)

    def canvas(self, image, m: int, n: int):
        """The (m*B) x (n*B) image that is cut into tiles."""
        raise NotImplementedError


def padded_resize(w, h, canvas_w, canvas_h):
    """LLaVA's resize_and_pad_image: the size the image takes inside the canvas (scalars or
    arrays): the limiting side fills it, the other is ceil-scaled and clamped; at least 1 px."""
    if np.ndim(w) == 0:
        scale_w, scale_h = canvas_w / w, canvas_h / h
        if scale_w < scale_h:
            return canvas_w, max(1, min(math.ceil(h * scale_w), canvas_h))
        return max(1, min(math.ceil(w * scale_h), canvas_w)), canvas_h
    scale_w, scale_h = canvas_w / w, canvas_h / h
    by_width = scale_w < scale_h
    new_w = np.where(by_width, canvas_w, np.clip(np.ceil(w * scale_h), 1, canvas_w))
    new_h = np.where(by_width, np.clip(np.ceil(h * scale_w), 1, canvas_h), canvas_h)
    return new_w.astype(np.int64), new_h.astype(np.int64)


class PaddedCanvasTiler(Tiler):
    """Aspect-preserving resize so the limiting side fills the canvas, centred on ``pad_colour``."""

    pad_colour = (0, 0, 0)

    def canvas(self, image, m, n):
        from PIL import Image

        w, h = image.size
        cw, ch = m * self.tile_size, n * self.tile_size
        new_w, new_h = padded_resize(w, h, cw, ch)
        out = Image.new("RGB", (cw, ch), self.pad_colour)
        out.paste(image.resize((new_w, new_h), Image.BICUBIC), ((cw - new_w) // 2, (ch - new_h) // 2))
        return out


class SingleTiler(Tiler):
    """One B x B crop, no tiling (stage-1 training): the image squashed, or padded to a square."""

    pad_colour = PaddedCanvasTiler.pad_colour

    def __init__(self, tile_size: int = 384, mode: str = "squash", tokens_per_crop: int = 196):
        super().__init__(tile_size, "none", tokens_per_crop)
        if mode not in ("squash", "pad"):
            raise ValueError(f"mode must be 'squash' or 'pad', got {mode!r}")
        self.mode = mode

    def _content(self, w, h):
        B = self.tile_size
        if self.mode == "squash":
            return B * B
        new_w, new_h = padded_resize(w, h, B, B)
        return new_w * new_h

    def reference(self, w, h):
        return {"m": 1, "n": 1, "crops": 1, "tokens": self.tokens_per_crop, "pixels": self._content(w, h),
                "encoder_pixels": self.tile_size ** 2}

    def _decide(self, w, h):
        return {"m": 1, "n": 1, "crops": 1, "tokens": self.tokens_per_crop,
                "pixels": self._content(w.astype(np.float64), h.astype(np.float64)),
                "encoder_pixels": float(self.tile_size ** 2)}

    def canvas(self, image, m, n):
        if self.mode == "pad":
            return PaddedCanvasTiler.canvas(self, image, m, n)
        from PIL import Image

        return image.resize((self.tile_size, self.tile_size), Image.BICUBIC)
