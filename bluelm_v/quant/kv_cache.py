"""INT8 KV cache (``kv8``): a transformers ``Cache`` whose layers store keys and values as int8
with one fp16 scale per (batch, head, token):  k[b, h, t, :] ~= sk[b, h, t] * qk[b, h, t, :].

Per-token scales make the cache appendable: a new chunk is quantised on its own and written
after the previous tokens, nothing already stored is re-quantised (chunked prefill and decode
see exactly the same stored values). Storage is preallocated for ``max_tokens`` when given (no
re-allocation during a 2048-token prefill), else grown by half its size (at least ``grow``).
``update`` returns the dequantised keys/values of that one layer (a transient the attention
consumes), so the resident cache is ~(1 + 2/head_dim)/4 of an fp32 cache.

    cache = Int8KVCache(max_tokens=2112)
    out = model(input_ids, past_key_values=cache, use_cache=True)
    cache.nbytes()     # bytes held by the int8 codes + scales

``Int8StaticKVCache`` is the same storage behind the runtime's static batch-1 cache API
(allocate / write_read / max_len / nbytes), for bluelm_v.engines.FastLlamaEngine.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

SCALE_DTYPE = torch.float16


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] -> (q int8 [..., T, D], scale fp16 [..., T, 1]), symmetric per (.., t)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_(min=1e-6).to(SCALE_DTYPE)
    q = torch.round(xf / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)


class Int8KVLayer(DynamicLayer):
    """One decoder layer's INT8 keys/values ([B, H, T, D] codes, [B, H, T, 1] scales)."""

    is_compileable = False
    is_croppable = True

    def __init__(self, max_tokens: int | None = None, grow: int = 256):
        super().__init__()
        self.max_tokens, self.grow = max_tokens, grow
        self.length = 0
        self._store: list[torch.Tensor] | None = None   # [qk, sk, qv, sv]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def _capacity(self) -> int:
        return 0 if self._store is None else self._store[0].shape[-2]

    def _reserve(self, need: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cap = self._capacity()
        if need <= cap:
            return
        if self.max_tokens and need <= self.max_tokens:
            new_cap = self.max_tokens                        # the whole budget at once
        else:
            new_cap = max(need, cap + max(self.grow, cap // 2))
        shapes = [(*k.shape[:-2], new_cap, k.shape[-1]), (*k.shape[:-2], new_cap, 1),
                  (*v.shape[:-2], new_cap, v.shape[-1]), (*v.shape[:-2], new_cap, 1)]
        dtypes = [torch.int8, SCALE_DTYPE, torch.int8, SCALE_DTYPE]
        new = [torch.zeros(s, dtype=d, device=k.device) for s, d in zip(shapes, dtypes)]
        if self._store is not None:
            for old, fresh in zip(self._store, new):
                fresh[..., : self.length, :] = old[..., : self.length, :]
        self._store = new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        end = self.length + t
        self._reserve(end, key_states, value_states)
        qk, sk, qv, sv = self._store
        qk[..., self.length:end, :], sk[..., self.length:end, :] = quantize_per_token(key_states)
        qv[..., self.length:end, :], sv[..., self.length:end, :] = quantize_per_token(value_states)
        self.length = end
        keys = dequantize_per_token(qk[..., :end, :], sk[..., :end, :], self.dtype)      # [B, H, T, D]
        values = dequantize_per_token(qv[..., :end, :], sv[..., :end, :], self.dtype)
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self._store is None else sum(t.numel() * t.element_size() for t in self._store)

    def reset(self) -> None:
        self.length = 0
        self._store = None
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def _map_batch(self, fn) -> None:
        if self._store is not None:
            self._store = [fn(t) for t in self._store]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


class Int8KVCache(Cache):
    """A transformers Cache of :class:`Int8KVLayer` (one per decoder layer, created lazily)."""

    def __init__(self, max_tokens: int | None = None, num_layers: int | None = None, grow: int = 256):
        if num_layers:
            super().__init__(layers=[Int8KVLayer(max_tokens, grow) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(Int8KVLayer, max_tokens, grow))
        self.max_tokens = max_tokens

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def kv_cache_nbytes(cache) -> int:
    """Resident bytes of any transformers cache (Int8KVCache or a plain DynamicCache)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


class Int8StaticKVCache:
    """The runtime's static batch-1 cache (bluelm_v/kv_cache.py API) stored as INT8:
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
