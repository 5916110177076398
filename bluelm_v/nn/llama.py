"""A transformers-free Llama causal LM with transformers' module and parameter names, so the
same checkpoints, quantizers and engines work on either implementation.

    llm: {name: hf_causal, preset: bluelm_3b_proxy, implementation: native}

Why: importing transformers' modelling code costs ~130 MB of resident memory in a process
(it pulls in torch._dynamo, torch.distributed.tensor, sympy, scipy, accelerate, ...). A phone
runtime carries none of that; the memory job (jobs/memory/) builds its measured process from
these modules and bluelm_v.nn.siglip. The forward maths follows transformers'
LlamaForCausalLM exactly (RMSNorm in fp32, RoPE with rotate_half, SDPA attention);
tests/test_native.py checks logits against transformers with the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# RMSNorm classes with the same maths (x * rsqrt(mean(x^2) + eps) in fp32, times weight):
# the engines read their weights directly.
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "NativeRMSNorm")

LLAMA_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "initializer_range", "head_dim", "hidden_act")


class NativeLlamaConfig(SimpleNamespace):
    """The attributes the engines read from a transformers LlamaConfig (nothing else)."""

    model_type = "llama"

    def __init__(self, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, vocab_size: int, num_key_value_heads: int | None = None,
                 tie_word_embeddings: bool = True, max_position_embeddings: int = 4096,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0, initializer_range: float = 0.02,
                 head_dim: int | None = None, hidden_act: str = "silu", **unsupported):
        if unsupported:
            raise ValueError(f"implementation native: unsupported config keys {sorted(unsupported)} "
                             f"(supported: {', '.join(LLAMA_KEYS)}); use implementation: transformers")
        if hidden_act != "silu":
            raise ValueError(f"implementation native: hidden_act {hidden_act!r} (only silu)")
        super().__init__(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                         vocab_size=vocab_size, num_key_value_heads=num_key_value_heads or num_attention_heads,
                         tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
                         rms_norm_eps=rms_norm_eps, rope_theta=rope_theta, initializer_range=initializer_range,
                         head_dim=head_dim or hidden_size // num_attention_heads, hidden_act=hidden_act,
                         sliding_window=None, use_return_dict=True)


def embedding_table(n: int, dim: int) -> nn.Embedding:
    """An uninitialised nn.Embedding (the builders initialise every weight). Skipping its
    normal_() matters on the meta device: meta normal_/arange run Python kernels that import
    sympy and friends (~70 MB of resident memory in the measured process)."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class NativeRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):                                      # [..., D] -> [..., D]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class NativeRotaryEmbedding(nn.Module):
    """Default Llama RoPE: forward(x, position_ids [B,P]) -> cos, sin [B,P,d] in x's dtype."""

    def __init__(self, config):
        super().__init__()
        d = config.head_dim
        steps = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float()   # CPU even under meta (see _embedding)
        inv_freq = 1.0 / (config.rope_theta ** (steps / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)      # [d/2]
        self.config = config

    def forward(self, x, position_ids):
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None]   # [B,P,d/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                        # [B,P,d]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class NativeLlamaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.scaling = c.num_attention_heads, c.num_key_value_heads, d, d ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):                      # x [B,L,D], cos/sin [B,L,d], mask [B,1,L,L]
        b, n, d = x.shape[0], x.shape[1], self.head_dim
        q = self.q_proj(x).view(b, n, self.n_heads, d).transpose(1, 2)     # [B,H,L,d]
        k = self.k_proj(x).view(b, n, self.n_kv, d).transpose(1, 2)        # [B,KV,L,d]
        v = self.v_proj(x).view(b, n, self.n_kv, d).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                           enable_gqa=self.n_kv != self.n_heads)    # [B,H,L,d]
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.n_heads * d))


class NativeLlamaMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NativeLlamaDecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = NativeLlamaAttention(c)
        self.mlp = NativeLlamaMLP(c)
        self.input_layernorm = NativeRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = NativeRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class NativeLlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = embedding_table(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(NativeLlamaDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = NativeRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = NativeRotaryEmbedding(c)


@dataclass
class NativeCausalLMOutput:
    logits: torch.Tensor            # [B, L, V]
    loss: torch.Tensor | None = None


class NativeLlamaForCausalLM(nn.Module):
    """transformers' LlamaForCausalLM names (model.layers.i.self_attn.q_proj, lm_head, ...);
    forward(input_ids | inputs_embeds, attention_mask, labels) without a cache (prefill and
    decode go through bluelm_v.plugins.engines, like for the transformers model)."""

    def __init__(self, config: NativeLlamaConfig):
        super().__init__()
        self.config = config
        self.model = NativeLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, **_unused):
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # [B,L,D]
        b, n = x.shape[:2]
        positions = torch.arange(n, device=x.device)[None].expand(b, n)                     # [B,L]
        cos, sin = self.model.rotary_emb(x, positions)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]       # [1,1,L,L]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]                          # [B,1,L,L]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        logits = self.lm_head(self.model.norm(x)).float()                                  # [B,L,V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return NativeCausalLMOutput(logits, loss)
