"""ONNX graphs of BlueLM-V with static shapes, as a phone NPU SDK wants them.

    export_vision(model, tiles, "vision.onnx")      pixels [B,3,S,S] -> visual tokens [B*T', D]
                                                    (encoder + downsampler + projector, B fixed)
    export_llm_step(model, rows, max_len, "p.onnx") one LLM step over a static KV buffer:
        embeds [1,R,D], k_cache/v_cache [L,KV,M,d], start [1] (position of row 0), last [1]
        (the row whose logits are returned) -> logits [1,V], k_cache', v_cache'
    R = the prefill chunk for the prefill graph, 1 for the decode graph. New K/V rows are written
    into the buffer with a one-hot matmul (exact; no scatter op needed), attention covers the
    whole buffer under a causal mask, as an NPU graph with a fixed KV cache does.

The LLM step is written out here from the transformers Llama modules' weights (RMSNorm, RoPE,
GQA, SwiGLU), exported with torch.onnx's TorchScript exporter (no onnxscript needed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bluelm_v.nn.kv_cache import dequantize_per_token, quantize_per_token


class VisionGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder, self.downsampler, self.projector = model.encoder, model.downsampler, model.projector

    def forward(self, pixels):                                   # [B,3,S,S]
        feats = self.encoder.transform(self.encoder.embed(pixels))   # [B,T,C]
        tokens = self.projector(self.downsampler(feats))        # [B,T',D]
        return tokens.reshape(-1, tokens.shape[-1])              # [B*T',D]


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


class LlamaStep(torch.nn.Module):
    """A functional Llama step over a static KV buffer (see the module docstring)."""

    def __init__(self, hf_model, max_len: int, kv_int8: bool = False):
        super().__init__()
        self.kv_int8 = kv_int8
        base, cfg = hf_model.model, hf_model.config
        self.layers, self.norm, self.lm_head = base.layers, base.norm, hf_model.lm_head
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = getattr(cfg, "rms_norm_eps", 1e-6)
        with torch.no_grad():
            cos, sin = base.rotary_emb(torch.zeros(1), torch.arange(max_len)[None])
        self.register_buffer("cos", cos[0].float(), persistent=False)     # [M, d]
        self.register_buffer("sin", sin[0].float(), persistent=False)
        self.register_buffer("slots", torch.arange(max_len), persistent=False)

    def _rms(self, module, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * module.weight

    def forward(self, embeds, k_cache, v_cache, start, last):
        r = embeds.shape[1]
        positions = start + torch.arange(r)                                  # [R]
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]   # [1,1,R,d]
        onehot = (self.slots[:, None] == positions[None, :]).to(embeds.dtype)   # [M,R]
        keep = 1.0 - onehot.sum(1)[None, :, None]                            # [1,M,1]
        allowed = self.slots[None, :] <= positions[:, None]                  # [R,M]
        group = self.heads // self.kv_heads
        x, new_k, new_v = embeds, [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._rms(layer.input_layernorm, x)
            q = attn.q_proj(h).view(1, r, self.heads, self.head_dim).transpose(1, 2)      # [1,H,R,d]
            k = attn.k_proj(h).view(1, r, self.kv_heads, self.head_dim).transpose(1, 2)   # [1,KV,R,d]
            v = attn.v_proj(h).view(1, r, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if self.kv_int8:                                                 # as the INT8 cache stores them
                k, v = (dequantize_per_token(*quantize_per_token(t), t.dtype) for t in (k, v))
            kc = k_cache[i] * keep + torch.matmul(onehot, k[0])              # [KV,M,d]
            vc = v_cache[i] * keep + torch.matmul(onehot, v[0])
            new_k.append(kc)
            new_v.append(vc)
            kf = kc.repeat_interleave(group, 0)[None]                        # [1,H,M,d]
            vf = vc.repeat_interleave(group, 0)[None]
            scores = torch.matmul(q, kf.transpose(-1, -2)) * self.head_dim ** -0.5   # [1,H,R,M]
            scores = scores.masked_fill(~allowed, float("-inf"))
            o = torch.matmul(scores.softmax(-1), vf).transpose(1, 2).reshape(1, r, -1)  # [1,R,H*d]
            x = x + attn.o_proj(o)
            h = self._rms(layer.post_attention_layernorm, x)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        tail = self._rms(self.norm, x.index_select(1, last))                 # [1,1,D]
        return self.lm_head(tail)[:, 0], torch.stack(new_k), torch.stack(new_v)


def _export(module, args, path, input_names, output_names, opset: int) -> str:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    return str(path)


def export_vision(model, tiles: int, path, opset: int = 17) -> str:
    size = model.encoder.image_size
    pixels = torch.zeros(tiles, 3, size, size)
    return _export(VisionGraph(model).eval(), (pixels,), path, ["pixels"], ["tokens"], opset)


def cache_shape(hf_model, max_len: int) -> tuple[int, int, int, int]:
    step = LlamaStep(hf_model, 1)
    return (len(step.layers), step.kv_heads, max_len, step.head_dim)


def export_llm_step(hf_model, rows: int, max_len: int, path, opset: int = 17, kv_int8: bool = False) -> str:
    step = LlamaStep(hf_model, max_len, kv_int8).eval()
    d = hf_model.config.hidden_size
    k = torch.zeros(cache_shape(hf_model, max_len))
    args = (torch.zeros(1, rows, d), k, k.clone(), torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long))
    return _export(step, args, path, ["embeds", "k_cache", "v_cache", "start", "last"],
                   ["logits", "k_out", "v_out"], opset)
