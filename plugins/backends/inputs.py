"""Deterministic benchmark inputs for the real backends: an image of the case's size and a
prompt whose LLM length (visual tokens included) is the case's ``prompt_tokens``."""
from __future__ import annotations

import threading
import time

FILLER = ("The screenshot shows a settings page with a list of options, a search bar at the top, "
          "and a row of icons along the bottom edge of the screen. ")


def synthetic_image(width: int, height: int, seed: int = 0):
    """A PIL RGB image: smooth gradients + seeded noise (compressible like a screenshot, never blank)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1), y / max(height, 1), (x + y) / max(width + height, 1)], -1) * 200.0
    pixels = base + rng.normal(0.0, 20.0, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def prompt_for(count_ids, visual_tokens: int, target: int, n_images: int = 1) -> tuple[str, int]:
    """The longest '<image>\\n' + filler + question whose LLM length stays <= ``target``
    (never shorter than the bare question). ``count_ids(prompt)`` -> template ids incl. one
    sentinel per image; returns (prompt, LLM length)."""
    question = "Describe the image in detail."

    def build(chars: int) -> str:
        text = (FILLER * (chars // len(FILLER) + 1))[:chars]
        return "<image>\n" * n_images + text + question

    def length(chars: int) -> int:
        return count_ids(build(chars)) - n_images + visual_tokens

    lo, hi = 0, max(0, target) * 8 + 64
    if length(lo) >= target:
        return build(0), length(0)
    while lo < hi:                                  # the largest char count that fits
        mid = (lo + hi + 1) // 2
        if length(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return build(lo), length(lo)


class PeakSampler:
    """Peak resident memory of this process over a block (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        from bluelm_v.runtime import current_rss_mb
        return current_rss_mb()

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())
