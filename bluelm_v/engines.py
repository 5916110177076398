"""LLM execution engines used by the runtime (batch 1, greedy):

    eng = make_engine(hf_model, kind="auto")      # "fast" for Llama-family, else "hf"
    eng.begin(max_len)                            # allocate the KV cache (reused when it fits)
    logits = eng.prefill(embeds [1,L,D], chunk=128)   # -> [V] logits of the last position
    nxt = eng.step(token_id)                      # one decode step (t1) -> next greedy token id
    toks = eng.steps(token_id, n)                 # n steps; CUDA graphs: queued, read once (decode_chunk)

``FastLlamaEngine`` (bluelm_v/fast_llama.py) runs a Llama-family model's own weights with a lean
forward (static KV cache, fused projections, CUDA graph per decode step). ``HFEngine`` is the
generic fallback: the model's own forward + a DynamicCache.
"""
from __future__ import annotations

import torch

from .fast_llama import FastLlamaEngine, model_dtype_device, one_at_a_time  # noqa: F401 (re-exported)
from .kv_cache import kv_cache_kind

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")


def make_engine(hf_model, kind: str = "auto", **kw):
    mt = getattr(hf_model.config, "model_type", "")
    if kind == "fast" or (kind == "auto" and mt in FAST_MODEL_TYPES and FastLlamaEngine.supports(hf_model)):
        return FastLlamaEngine(hf_model, **kw)
    return HFEngine(hf_model)


class HFEngine:
    """Any transformers causal LM: its own forward with a DynamicCache, chunk by chunk."""

    name = "hf"

    def __init__(self, hf_model):
        self.model = hf_model
        self.length = 0
        self.cache = None

    def begin(self, max_len: int) -> None:
        from transformers import DynamicCache

        if kv_cache_kind(self.model) == "int8":
            from .quant.kv_cache import Int8KVCache
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
        nbytes = getattr(self.cache, "nbytes", None)
        if callable(nbytes):
            return int(nbytes())
        layers = getattr(self.cache, "layers", None) or []
        return sum(t.numel() * t.element_size() for l in layers
                   for t in (getattr(l, "keys", None), getattr(l, "values", None)) if t is not None)
