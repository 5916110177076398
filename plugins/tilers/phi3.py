"""Phi-3-vision HD transform (docs/design.md §5.8), as the model repository's
image_processing_phi3_v.py (``HD_transform``, ``padding_336``) does it:

    a portrait image is transposed first, so w >= h; ratio = w / h;
    scale = the largest s with s * ceil(s / ratio) <= hd_num (Phi-3-vision 16, Phi-3.5 4);
    resize to new_w = s * 336, new_h = int(new_w / ratio); pad the height with white to a
    multiple of 336 (centred: int(diff / 2) on top); transpose back.

Crops: the padded image's rows x cols 336-px crops plus a global 336 x 336 view first.
Tokens (its processor's num_img_tokens): (crops + 1) * 144 + 1 + (rows + 1) * 12, with rows
the padded image's height / 336. A strip whose new_h is 0 (e.g. 100000 x 1) fails to resize
in the reference: skipped as ``zero_side_after_resize``.
"""
from __future__ import annotations

import numpy as np

from .base import PaddedCanvasTiler, trunc

CROP = 336
ZERO_SKIP = "zero_side_after_resize"


class Phi3VisionTiler(PaddedCanvasTiler):
    """Phi-3-vision HD transform: up to hd_num 336-px crops on a white-padded canvas + a global view."""

    pad_colour = (255, 255, 255)
    skip_reason = ZERO_SKIP

    def __init__(self, hd_num: int = 16, tokens_per_crop: int = 144):
        if hd_num < 1:
            raise ValueError(f"hd_num must be >= 1, got {hd_num}")
        super().__init__(CROP, "first", tokens_per_crop)
        self.hd_num = int(hd_num)

    def _shape_scalar(self, w, h):
        """(new_w, new_h, padded height) in the transposed frame (w >= h)."""
        ratio = w / h
        scale = 1
        while scale * np.ceil(scale / ratio) <= self.hd_num:
            scale += 1
        scale -= 1
        new_w = int(scale * CROP)
        new_h = int(new_w / ratio)
        return new_w, new_h, int(np.ceil(new_h / CROP) * CROP)

    def _tokens(self, crops, rows):
        return (crops + 1) * self.tokens_per_crop + 1 + (rows + 1) * 12

    def reference(self, w, h):
        trans = w < h
        a, b = (h, w) if trans else (w, h)
        new_w, new_h, tar = self._shape_scalar(a, b)
        if new_h == 0:
            return {"m": 0, "n": 0, "crops": 0, "tokens": -1, "pixels": 0, "encoder_pixels": 0, "skip": ZERO_SKIP}
        width, height = (tar, new_w) if trans else (new_w, tar)
        rows, cols = height // CROP, width // CROP
        crops = rows * cols + 1
        return {"m": cols, "n": rows, "crops": crops, "tokens": self._tokens(rows * cols, rows),
                "pixels": new_w * new_h, "encoder_pixels": crops * CROP * CROP}

    def _decide(self, w, h):
        trans = w < h
        a = np.where(trans, h, w).astype(np.float64)
        b = np.where(trans, w, h).astype(np.float64)
        ratio = a / b
        scale = np.ones(len(w), np.int64)
        going = np.ones(len(w), bool)
        for s in range(1, self.hd_num + 2):        # the while loop: s * ceil(s / ratio) grows with s
            going &= s * np.ceil(s / ratio) <= self.hd_num
            scale += going
        scale -= 1
        new_w = scale * CROP
        new_h = trunc(new_w / ratio)
        tar = (np.ceil(new_h / CROP) * CROP).astype(np.int64)
        width, height = np.where(trans, tar, new_w), np.where(trans, new_w, tar)
        rows, cols = height // CROP, width // CROP
        crops = rows * cols + 1
        return {"m": cols, "n": rows, "crops": crops, "tokens": self._tokens(rows * cols, rows),
                "pixels": (new_w * new_h).astype(np.float64), "encoder_pixels": crops * float(CROP * CROP),
                "skipped": new_h == 0}

    def canvas(self, image, m, n):
        """The HD image: resized to (new_w, new_h) in the landscape frame, padded white to whole crops."""
        from PIL import Image

        w, h = image.size
        trans = w < h
        new_w, new_h, tar = self._shape_scalar(*((h, w) if trans else (w, h)))
        size = (new_h, new_w) if trans else (new_w, new_h)
        out = Image.new("RGB", (m * CROP, n * CROP), self.pad_colour)
        top = int((tar - new_h) / 2)
        out.paste(image.resize(size, Image.BILINEAR), (top, 0) if trans else (0, top))
        return out

    def global_view(self, image):
        from PIL import Image

        w, h = image.size
        return self.canvas(image, *self.select(w, h)).resize((CROP, CROP), Image.BICUBIC)

