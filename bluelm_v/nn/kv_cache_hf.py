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
(allocate / write_read / max_len / nbytes), for bluelm_v.plugins.engines.FastLlamaEngine.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

from bluelm_v.nn.kv_cache import SCALE_DTYPE, Int8StaticKVCache, dequantize_per_token, quantize_per_token  # noqa: F401


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
