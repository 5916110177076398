"""``hf``: any transformers causal LM run by its own forward with a DynamicCache (the generic
engine; the API every engine has is in plugins/engines/__init__.py)."""
from __future__ import annotations

import torch

from bluelm_v.model import model_dtype_device
from bluelm_v.nn.kv_cache import cache_nbytes, kv_cache_kind

from .batch_api import BatchAPI


def one_at_a_time(step, token: int, n: int) -> list[int]:
    """n greedy tokens from ``token`` by n calls of ``step`` (engines without queued steps)."""
    out = []
    for _ in range(n):
        token = step(token)
        out.append(token)
    return out


class HFEngine(BatchAPI):
    """Any transformers causal LM: its own forward with a DynamicCache, chunk by chunk."""

    name = "hf"

    def __init__(self, hf_model):
        self.model = hf_model
        self.length = 0
        self.cache = None

    def begin(self, max_len: int) -> None:
        from transformers import DynamicCache

        if kv_cache_kind(self.model) == "int8":
            from bluelm_v.nn.kv_cache_hf import Int8KVCache
            self.cache = Int8KVCache(max_tokens=max_len)
        else:
            self.cache = DynamicCache(config=self.model.config)
        self.length = 0

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """[1,T,D] -> [V] logits of the last position; appends T positions to the cache."""
        t = embeds.shape[1]
        pos = torch.arange(self.length, self.length + t, device=embeds.device)
        out = self.model(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True,
                         cache_position=pos, position_ids=pos[None], logits_to_keep=1)
        self.length += t
        return out.logits[0, -1].float()

    def prefill(self, embeds: torch.Tensor, chunk: int) -> torch.Tensor:
        logits = None
        for start in range(0, embeds.shape[1], chunk):
            logits = self.forward(embeds[:, start:start + chunk])
        return logits

    @torch.no_grad()
    def step(self, token: int) -> int:
        emb = self.model.get_input_embeddings()(torch.tensor([[token]], device=self.device))
        self.last_logits = self.forward(emb)
        return int(self.last_logits.argmax())

    decode_chunk = 1

    def steps(self, token: int, n: int) -> list[int]:
        return one_at_a_time(self.step, token, n)

    @property
    def device(self):
        return model_dtype_device(self.model)[1]

    @property
    def cache_bytes(self) -> int:
        return cache_nbytes(self.cache)

    def _new_batch(self):
        """Batches of sequences (plugins/engines/batch_api.py, hf_batch.py)."""
        from .hf_batch import HFBatch

        return HFBatch(self)
