"""A static KV cache for batch-1 generation: preallocated, written in place, never reallocated.

    cache = KVCache.allocate(layers=30, kv_heads=3, head_dim=64, max_len=2176, dtype, device)
    keys, values = cache.write_read(layer, positions, k, v, kv_len)   # [1,KV,kv_len,d]
    cache.k[layer]  # [kv_heads, max_len, head_dim]; positions >= cache.length are stale

An INT8 cache with the same API (bluelm_v.quant.kv_cache.Int8StaticKVCache) is used when the
``kv8`` quantizer marked the model (``allocate_static``).
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


def kv_cache_kind(hf_model) -> str:
    """'int8' when the kv8 quantizer marked the model, else 'fp'."""
    try:
        from .quant.schemes import kv_cache_kind as kind
    except ImportError:
        return "fp"
    return kind(hf_model)


def allocate_static(hf_model, layers: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
    """The static cache the model asks for: INT8 (kv8) or in the model dtype."""
    if kv_cache_kind(hf_model) == "int8":
        from .quant.kv_static import Int8StaticKVCache
        return Int8StaticKVCache.allocate(layers, kv_heads, head_dim, max_len, dtype, device)
    return KVCache.allocate(layers, kv_heads, head_dim, max_len, dtype, device)
