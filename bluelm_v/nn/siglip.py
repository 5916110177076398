"""Transformers-free SigLIP vision layers with transformers' module and parameter names (the
``implementation: native`` of the ``siglip`` encoder; why: bluelm_v.nn.llama).

    encoder: {name: siglip, preset: so400m, implementation: native}

The maths follows transformers' SiglipEncoderLayer exactly (tanh-GELU, SDPA attention);
tests/test_native.py checks features against transformers with the same weights.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llama import embedding_table


class NativeSiglipEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        n = (c.image_size // c.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = embedding_table(n, c.hidden_size)
        self.register_buffer("position_ids", torch.arange(n, device="cpu").expand(1, -1), persistent=False)

    def forward(self, pixel_values):                          # [k,3,B,B] -> [k,T,C]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))   # [k,C,B/p,B/p]
        return x.flatten(2).transpose(1, 2) + self.position_embedding(self.position_ids)


class NativeSiglipAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj = nn.Linear(c.hidden_size, c.hidden_size), nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj, self.out_proj = nn.Linear(c.hidden_size, c.hidden_size), nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):                                      # [k,T,C] -> [k,T,C]
        k, t, _ = x.shape
        heads = [p(x).view(k, t, self.n_heads, self.head_dim).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]                     # 3 x [k,H,T,d]
        o = F.scaled_dot_product_attention(*heads, scale=self.scale)                  # [k,H,T,d]
        return self.out_proj(o.transpose(1, 2).reshape(k, t, -1))


class NativeSiglipMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class NativeSiglipLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = NativeSiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = NativeSiglipMLP(c)

    def forward(self, x, attention_mask=None):                 # [k,T,C] -> [k,T,C]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def siglip_tower(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, intermediate_size: int,
                 patch_size: int, image_size: int, layer_norm_eps: float = 1e-6, num_channels: int = 3,
                 keep_layers: int | None = None):
    """(config, embeddings, layers[:keep_layers]) with transformers' SiglipVisionModel names."""
    config = SimpleNamespace(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                             num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                             patch_size=patch_size, image_size=image_size, layer_norm_eps=layer_norm_eps,
                             num_channels=num_channels, initializer_range=0.02)
    n = num_hidden_layers if keep_layers is None else keep_layers
    return config, NativeSiglipEmbeddings(config), nn.ModuleList(NativeSiglipLayer(config) for _ in range(n))
