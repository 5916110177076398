"""Tiling decisions priced in phone seconds (docs/design.md §5.10), through a backend's public
contract only (``load(cfg, registry)``, ``run_case(case) -> {encode_s, prefill_s, ...}``).

The backend (by default the simulated Dimensity 9300) runs the paper's model: a 384-px SigLIP
tile per crop, 196 LLM tokens per crop. A decision of another rule is priced as that model
carrying the rule's load:

    encode_s  = E(c), c = the pixels the rule's encoder processes / 384^2 (crop-equivalents;
                a rule with 448-px or variable-size views costs in proportion to its pixels)
    prefill_s = P(t), t = the rule's visual tokens + ``text_tokens``

E is measured with run_case at every whole crop count 1 .. ceil(max c) (grids k x 1 on a
one-tile-per-crop tiler, read back from the result's ``crops``) and interpolated linearly
(E(0) = 0); P at the smallest prompt the backend accepts (one crop's tokens, 196) and at every
chunk boundary (k*chunk and k*chunk + 1) up to max t, interpolated linearly. A prompt below
that smallest one is priced at it (an upper bound; counted in ``n_below_floor``). Attention
cost that grows faster than the pixel count inside a larger view is not modelled.
"""
from __future__ import annotations

import math

import numpy as np

REFERENCE_TILE = 384


class PhonePricer:
    """Encode and prefill seconds per decision, from a loaded backend's run_case."""

    def __init__(self, backend, tiles_per_batch: int = 4, prefill_chunk: int = 128, text_tokens: int = 0,
                 quantizer: dict | None = None):
        self.backend, self.text_tokens = backend, int(text_tokens)
        self.chunk = int(prefill_chunk)
        self.base = {"image": [REFERENCE_TILE, REFERENCE_TILE], "tiles_per_batch": int(tiles_per_batch),
                     "prefill_chunk": self.chunk, "prompt_tokens": 0, "decode_tokens": 0,
                     "quantizer": quantizer or {"name": "bluelm_mixed"}}
        self._encode = {0: 0.0}
        self._prefill: dict[int, float] = {}
        one = self._run(1, 0)
        self.floor = int(one["prompt_tokens"])          # the smallest prompt a case can have
        self._encode[int(one["crops"])] = float(one["encode_s"])
        self._prefill[self.floor] = float(one["prefill_s"])
        self.n_cases = 1

    @classmethod
    def from_config(cls, node, registry):
        """A pricer from the ``pricing`` node: {backend: {name, ...}, tiles_per_batch, prefill_chunk, ...}."""
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True) if hasattr(node, "_metadata") else dict(node)
        backend = registry.create_from_config("backend", node["backend"], "pricing.backend")
        backend.load({"tiler": {"name": "single"}}, registry)     # one 384-px crop per grid cell
        return cls(backend, node.get("tiles_per_batch", 4), node.get("prefill_chunk", 128),
                   node.get("text_tokens", 0), node.get("quantizer"))

    def describe(self) -> dict:
        info = self.backend.describe() if hasattr(self.backend, "describe") else {}
        return {"backend": info.get("backend", type(self.backend).__name__), "profile": info.get("profile"),
                "tiles_per_batch": self.base["tiles_per_batch"], "prefill_chunk": self.chunk,
                "text_tokens": self.text_tokens, "quantizer": self.base["quantizer"],
                "prompt_floor_tokens": self.floor, "run_cases": self.n_cases}

    def _run(self, crops: int, prompt: int) -> dict:
        return self.backend.run_case({**self.base, "grid": [crops, 1], "prompt_tokens": int(prompt)})

    def _encode_s(self, crops: int) -> float:
        r = self._run(crops, 0)
        if int(r["crops"]) != crops:
            from bluelm_v.errors import ConfigError

            raise ConfigError(f"pricing.backend: run_case answered {r['crops']} crops for a {crops} x 1 grid; pricing "
                              f"needs a backend that honours case['grid'] with one crop per grid cell")
        return float(r["encode_s"])

    def _table(self, table: dict, points, measure) -> tuple[np.ndarray, np.ndarray]:
        for p in points:
            if p not in table:
                table[p] = measure(p)
                self.n_cases += 1
        keys = np.array(sorted(table), np.float64)
        return keys, np.array([table[k] for k in sorted(table)])

    def price(self, encoder_pixels, tokens) -> tuple[np.ndarray, np.ndarray, int]:
        """(encode_s, prefill_s, n_below_floor) per decision; NaN where a decision is skipped
        (tokens < 0) or its pixels are unknown."""
        enc_px = np.asarray(encoder_pixels, np.float64)
        tok = np.asarray(tokens, np.float64)
        valid = tok >= 0
        crops = enc_px / REFERENCE_TILE**2
        top = int(math.ceil(np.nanmax(crops[valid]))) if valid.any() and np.isfinite(crops[valid]).any() else 1
        ek, ev = self._table(self._encode, range(1, max(top, 1) + 1), self._encode_s)
        prompt = tok + self.text_tokens
        hi = int(prompt[valid].max()) if valid.any() else self.floor
        points = [self.floor] + [p for k in range(1, hi // self.chunk + 2)
                                 for p in (k * self.chunk, k * self.chunk + 1) if self.floor < p <= hi + self.chunk]
        pk, pv = self._table(self._prefill, points, lambda t: float(self._run(1, t)["prefill_s"]))
        encode = np.interp(crops, ek, ev)
        prefill = np.interp(np.maximum(prompt, self.floor), pk, pv)
        encode[~valid], prefill[~valid] = np.nan, np.nan
        return encode, prefill, int((valid & (prompt < self.floor)).sum())


def validate_pricing(node, registry) -> None:
    """Check a ``pricing`` config node before any work starts."""
    from bluelm_v.errors import ConfigError

    def _positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if node is None or not node.get("enabled", True):
        return
    if node.get("backend") is None:
        raise ConfigError("pricing.backend: a backend node, e.g. {name: simulated_npu, profile: dimensity9300}")
    registry.validate_node("backend", node.get("backend"), "pricing.backend")
    for key in ("tiles_per_batch", "prefill_chunk"):
        if not _positive_int(node.get(key)):
            raise ConfigError(f"pricing.{key}: a positive integer, got {node.get(key)!r}")
    text = node.get("text_tokens", 0)
    if not isinstance(text, int) or isinstance(text, bool) or text < 0:
        raise ConfigError(f"pricing.text_tokens: a non-negative integer, got {text!r}")
    if not _positive_int(node.get("scale_to", 1)):
        raise ConfigError(f"pricing.scale_to: a positive integer, got {node.get('scale_to')!r}")
