"""The runtime's static KV caches (preallocated, written in place, never reallocated) and the
per-token INT8 codec the ``kv8`` quantizer's caches share. Imports nothing but torch: a
deployment process (bluelm_v.nn.llama) never loads transformers.

    cache = allocate_static(llm, layers=30, kv_heads=3, head_dim=64, max_len=2176, dtype, device)
    keys, values = cache.write_read(layer, positions, k, v, kv_len)   # [1,KV,kv_len,d]
    cache.k[layer]  # KVCache: [kv_heads, max_len, head_dim]; positions >= cache.length are stale

``KVCache`` stores keys/values in the model dtype; ``Int8StaticKVCache`` stores int8 codes with
one fp16 scale per (head, token); ``BatchedKVCache`` holds several sequences (slots) for batched
decoding (plugins/engines/batched.py). ``allocate_static`` picks the one the model is marked for
(``kv_cache_kind``: the ``kv8`` quantizer sets ``KV_CACHE_ATTR``). The transformers ``Cache``
with the same storage is bluelm_v.nn.kv_cache_hf.Int8KVCache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor          # [layers, kv_heads, max_len, head_dim]
    v: torch.Tensor          # [layers, kv_heads, max_len, head_dim]
    length: int = 0          # positions filled so far

    @classmethod
    def allocate(cls, layers: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (layers, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        self.length = 0

    def write_read(self, i: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer i's k/v [KV,T,d] at ``positions``; return its first kv_len [1,KV,S,d]."""
        self.k[i].index_copy_(1, positions, k)
        self.v[i].index_copy_(1, positions, v)
        return self.k[i, :, :kv_len][None], self.v[i, :, :kv_len][None]


SCALE_DTYPE = torch.float16


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] -> (q int8 [..., T, D], scale fp16 [..., T, 1]), symmetric per (.., t)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_(min=1e-6).to(SCALE_DTYPE)
    q = torch.round(xf / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)


class Int8StaticKVCache:
    """The runtime's static batch-1 cache (bluelm_v/nn/kv_cache.py API) stored as INT8:
    codes [layers, kv_heads, max_len, head_dim] int8 + scales [layers, kv_heads, max_len, 1] fp16."""

    def __init__(self, qk, sk, qv, sv, dtype):
        self.qk, self.sk, self.qv, self.sv, self.dtype = qk, sk, qv, sv, dtype
        self.length = 0
        self._work: tuple | None = None   # one layer's dequantised K and V, reused every call

    @classmethod
    def allocate(cls, layers: int, kv_heads: int, head_dim: int, max_len: int, dtype, device) -> "Int8StaticKVCache":
        codes = (layers, kv_heads, max_len, head_dim)
        scales = (layers, kv_heads, max_len, 1)
        return cls(torch.zeros(codes, dtype=torch.int8, device=device), torch.zeros(scales, dtype=SCALE_DTYPE, device=device),
                   torch.zeros(codes, dtype=torch.int8, device=device), torch.zeros(scales, dtype=SCALE_DTYPE, device=device),
                   dtype)

    @property
    def max_len(self) -> int:
        return self.qk.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qk, self.sk, self.qv, self.sv))

    def reset(self) -> None:
        self.length = 0

    def write_read(self, i: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store k, v [KV, T, d] at ``positions`` [T] of layer i; return that layer's first
        ``kv_len`` positions dequantised, [1, KV, S, d] in k's dtype. The result lives in one
        workspace reused by every call (no fresh allocation, no page faults per step): it is
        valid until the next write_read."""
        qk, sk = quantize_per_token(k)
        qv, sv = quantize_per_token(v)
        self.qk[i].index_copy_(1, positions, qk)
        self.sk[i].index_copy_(1, positions, sk)
        self.qv[i].index_copy_(1, positions, qv)
        self.sv[i].index_copy_(1, positions, sv)
        if self._work is None or self._work[0].dtype != k.dtype:
            shape = (self.qk.shape[1], self.max_len, self.qk.shape[3])
            self._work = (torch.empty(shape, dtype=k.dtype, device=k.device),
                          torch.empty(shape, dtype=v.dtype, device=v.device))
        keys, values = self._work[0][:, :kv_len], self._work[1][:, :kv_len]              # [KV, S, d]
        keys.copy_(self.qk[i, :, :kv_len]).mul_(self.sk[i, :, :kv_len])
        values.copy_(self.qv[i, :, :kv_len]).mul_(self.sv[i, :, :kv_len])
        return keys[None], values[None]


def cache_nbytes(cache) -> int:
    """Bytes of a cache's keys and values: its own ``nbytes`` (property or method) where it has
    one, else a transformers cache's per-layer ``keys`` / ``values``."""
    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return int(nbytes() if callable(nbytes) else nbytes)
    layers = getattr(cache, "layers", None) or []
    return sum(t.numel() * t.element_size() for l in layers
               for t in (getattr(l, "keys", None), getattr(l, "values", None)) if t is not None)


KV_CACHE_ATTR = "bluelm_v_kv_cache"   # set to "int8" on an LLM by the kv8 quantizer


def _inner(module):
    """The transformers-style model inside an LM wrapper (.model), else the module itself."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) and hasattr(inner, "config") else module


def kv_cache_kind(model) -> str:
    """'int8' when the kv8 quantizer marked this model (or its LLM), else 'fp'."""
    for m in (model, getattr(model, "llm", None), _inner(model), _inner(getattr(model, "llm", model))):
        if m is not None and getattr(m, KV_CACHE_ATTR, None) == "int8":
            return "int8"
    return "fp"


def allocate_static(hf_model, layers: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
    """The static cache the model asks for: INT8 (kv8) or in the model dtype."""
    if kv_cache_kind(hf_model) == "int8":
        return Int8StaticKVCache.allocate(layers, kv_heads, head_dim, max_len, dtype, device)
    return KVCache.allocate(layers, kv_heads, head_dim, max_len, dtype, device)


@dataclass
class BatchedKVCache:
    """Static cache of several sequences (slots), for batched decoding: slot b of layer i is
    ``k[i, b]`` [kv_heads, max_len, head_dim], the batch-1 layout. Zero-filled at allocation so
    masked positions hold finite values (an additive -inf mask times a stale NaN would be NaN)."""

    k: torch.Tensor          # [layers, slots, kv_heads, max_len, head_dim]
    v: torch.Tensor          # [layers, slots, kv_heads, max_len, head_dim]

    @classmethod
    def allocate(cls, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> "BatchedKVCache":
        shape = (layers, slots, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions (every layer) into slot ``dst``."""
        if src != dst:
            self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
            self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])
