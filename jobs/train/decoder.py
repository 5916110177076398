"""The LLM's decoder stack as the training step runs it (docs/design.md §9): one forward for
transformers' Llama (``hf_causal``) and the native Llama of bluelm_v.nn.llama (same module and
parameter names), with

- positions given per token (they restart at every sample of a packed row),
- attention kept inside each sample of a packed row, by one of
    ``sdpa``    scaled_dot_product_attention with a dense block-diagonal causal mask [B,1,L,L]
                (any device; the whole L x L square is computed),
    ``flex``    FlexAttention with a document BlockMask: blocks that cross samples are skipped
                (CUDA: compiled to one Triton kernel; FlexAttention has no CPU backward),
    ``varlen``  torch.nn.attention.varlen (flash attention over cu_seqlens: only each sample's
                own causal triangle is computed; CUDA only),
  or plain causal attention for right-padded rows (padding is never attended by a real token),
- optionally fused q|k|v and gate|up matmuls: the weights are concatenated inside the forward,
  so the parameters (and every checkpoint) keep their q_proj / k_proj / v_proj, gate_proj /
  up_proj names and shapes; autograd hands each its slice of the fused gradient.

    layout = attention_layout("varlen", doc_lens=[[812, 3100, 184], [4096]], length=4096, device=dev)
    hidden = decoder_hidden(lm, embeds, layout, fused=True)       # [B, L, D] after the final norm

The maths is transformers' LlamaDecoderLayer (RMSNorm, RoPE with rotate_half, SiLU MLP); models
with other layer types are refused in one line by :func:`unsupported`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTIONS = ("auto", "sdpa", "flex", "varlen")


def resolve_attention(name: str, device_type: str) -> str:
    """``auto`` -> ``varlen`` on CUDA (flash kernels, no mask, only each sample's own triangle),
    ``sdpa`` elsewhere (FlexAttention has no CPU backward; varlen is CUDA-only)."""
    if name not in ATTENTIONS:
        raise ValueError(f"attention {name!r}: use one of {ATTENTIONS}")
    if name == "auto":
        return "varlen" if device_type == "cuda" and varlen_available() else "sdpa"
    if name in ("varlen", "flex") and device_type != "cuda":
        raise ValueError(f"attention {name!r} needs a CUDA device (training here runs on {device_type}); use sdpa")
    if name == "varlen" and not varlen_available():
        raise ValueError("attention 'varlen': this torch has no torch.nn.attention.varlen; use flex or sdpa")
    return name


def varlen_available() -> bool:
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class AttentionLayout:
    """How the tokens of a [B, L] batch attend, built once per micro-batch, used by every layer."""

    kind: str                       # causal | sdpa | flex | varlen
    position_ids: Any               # [B, L] long (device)
    mask: Any = None                # sdpa: [B, 1, L, L] bool
    block_mask: Any = None          # flex: BlockMask
    cu_seqlens: Any = None          # varlen: [n_docs + 1] int32 over the flattened B*L tokens
    max_len: int = 0                # varlen: longest document (the row length: one compiled shape)


def attention_layout(kind: str, doc_lens: list[list[int]] | None, length: int, device,
                     key_mask=None) -> AttentionLayout:
    """``doc_lens``: per row, the lengths of its documents (summing to ``length``; the padding at
    a row's end is a document of its own). None: ordinary rows, positions 0..L-1, causal
    attention (``key_mask`` [B, L]: a 0/1 padding mask that is not right-padding)."""
    import torch

    from bluelm_v.splice import to_device

    if doc_lens is None:
        b = 1 if key_mask is None else key_mask.shape[0]
        pos = torch.arange(length, device=device)[None].expand(b, length)          # [B, L]
        if key_mask is None:
            return AttentionLayout("causal", pos)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return AttentionLayout("sdpa", pos, mask=causal & key_mask.to(device).bool()[:, None, None, :])
    for r, row in enumerate(doc_lens):
        if sum(row) != length or min(row) < 1:
            raise ValueError(f"packed row {r}: document lengths {row} must be >= 1 and sum to {length}")
    lens = [torch.tensor(row, dtype=torch.long) for row in doc_lens]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in doc_lens])   # [B, L]
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(x)), x) for x in lens])    # [B, L]
    pos = to_device(pos, device)                                               # pinned, no stream sync
    if kind == "varlen":
        cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(lens).cumsum(0)]).to(torch.int32)
        return AttentionLayout("varlen", pos, cu_seqlens=to_device(cu, device), max_len=length)
    doc = to_device(doc, device)
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)

        bm = create_block_mask(same_document_causal, len(doc_lens), None, length, length, device=device)
        return AttentionLayout("flex", pos, block_mask=bm)
    if kind != "sdpa":
        raise ValueError(f"attention layout {kind!r}: use sdpa, flex or varlen")
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]                              # [B, L, L]
    return AttentionLayout("sdpa", pos, mask=(same_doc & causal)[:, None])      # [B, 1, L, L]


def unsupported(lm) -> str | None:
    """Why the training decoder cannot run this causal LM (None: it can)."""
    from bluelm_v.nn.llama import RMSNORM_CLASSES

    cfg = lm.config
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None or not len(layers) or getattr(lm, "lm_head", None) is None:
        return f"{type(lm).__name__} has no model.layers / lm_head"
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    missing = [n for mod, n in need if getattr(mod, n, None) is None]
    if missing:
        return f"{type(layer).__name__} lacks {', '.join(missing)}"
    for name in ("input_layernorm", "post_attention_layernorm"):
        if type(getattr(layer, name, None)).__name__ not in RMSNORM_CLASSES:
            return f"{type(layer).__name__}.{name} is {type(getattr(layer, name, None)).__name__}, not a Llama RMSNorm"
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        return f"{type(attn).__name__} normalises q/k (not Llama attention)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"sliding-window attention ({cfg.sliding_window})"
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout"
    return None


def _rotate_half(x):
    import torch

    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _project(x, mods, fused: bool):
    """[m(x) for m in mods], as one matmul over the concatenated weights when ``fused``."""
    import torch
    import torch.nn.functional as F

    biases = [m.bias for m in mods]
    if not fused or any((b is None) != (biases[0] is None) for b in biases):
        return [m(x) for m in mods]
    w = torch.cat([m.weight for m in mods])                                   # [sum out, D]
    b = None if biases[0] is None else torch.cat(biases)
    return list(F.linear(x, w, b).split([m.weight.shape[0] for m in mods], dim=-1))


def attend(q, k, v, layout: AttentionLayout, scale: float):
    """q [B, L, H, d], k/v [B, L, KV, d] -> [B, L, H*d] under ``layout``."""
    import torch.nn.functional as F

    b, n, h, d = q.shape
    gqa = k.shape[2] != h
    if layout.kind == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        if gqa:
            k, v = k.repeat_interleave(h // k.shape[2], dim=2), v.repeat_interleave(h // k.shape[2], dim=2)
        o = varlen_attn(q.reshape(b * n, h, d), k.reshape(b * n, h, d), v.reshape(b * n, h, d),
                        layout.cu_seqlens, layout.cu_seqlens, layout.max_len, layout.max_len,
                        **_varlen_causal_kwargs(scale))                          # [B*L, H, d]
        return o.reshape(b, n, h * d)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, L, d]
    if layout.kind == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        o = flex_attention(qt, kt, vt, block_mask=layout.block_mask, scale=scale, enable_gqa=gqa)
    elif layout.kind == "causal":
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=layout.mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(b, n, h * d)                              # [B, L, H*d]


_VARLEN_KW: dict = {}


def _varlen_causal_kwargs(scale: float) -> dict:
    """Causal varlen_attn across torch versions (``is_causal=True`` in early ones, a (-1, 0)
    window later); ``scale`` where the function takes one (else its default 1/sqrt(d), Llama's)."""
    if "params" not in _VARLEN_KW:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_KW["params"] = set(inspect.signature(varlen_attn).parameters)
    params = _VARLEN_KW["params"]
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "scale" in params:
        kw["scale"] = scale
    return kw


def decoder_layer(layer, x, cos, sin, layout: AttentionLayout, heads: int, kv_heads: int, head_dim: int,
                  fused: bool):
    """One Llama decoder layer: x [B, L, D], cos/sin [B, L, d] -> [B, L, D]."""
    attn, mlp = layer.self_attn, layer.mlp
    b, n, _ = x.shape
    h = layer.input_layernorm(x)
    q, k, v = _project(h, (attn.q_proj, attn.k_proj, attn.v_proj), fused)
    q = q.view(b, n, heads, head_dim)                                          # [B, L, H, d]
    k = k.view(b, n, kv_heads, head_dim)                                       # [B, L, KV, d]
    v = v.view(b, n, kv_heads, head_dim)
    c, s = cos[:, :, None], sin[:, :, None]                                    # [B, L, 1, d]
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    x = x + attn.o_proj(attend(q, k, v, layout, head_dim ** -0.5))
    h = layer.post_attention_layernorm(x)
    g, u = _project(h, (mlp.gate_proj, mlp.up_proj), fused)
    return x + mlp.down_proj(mlp.act_fn(g) * u)


_COMPILED: dict = {}


def compiled_decoder_layer(mode: str | None = "default"):
    """decoder_layer under torch.compile (one graph serves every layer: the layer module is an
    argument whose parameters dynamo lifts as inputs)."""
    key = mode or "default"
    if key not in _COMPILED:
        import torch

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        kw = {} if key == "default" else {"mode": key}
        _COMPILED[key] = torch.compile(decoder_layer, **kw)
    return _COMPILED[key]


def decoder_hidden(lm, embeds, layout: AttentionLayout, fused: bool = True, layer_fn=None,
                   checkpoint: bool = False):
    """Final-norm hidden states [B, L, D] of causal LM ``lm`` (LlamaForCausalLM or
    NativeLlamaForCausalLM) for input embeddings [B, L, D] under ``layout``."""
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    fn = layer_fn or decoder_layer
    x = embeds
    pos = layout.position_ids
    if pos.shape[0] != x.shape[0]:
        pos = pos.expand(x.shape[0], -1)
    cos, sin = lm.model.rotary_emb(x, pos)                                     # [B, L, d] each
    for layer in lm.model.layers:
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as run_checkpointed

            x = run_checkpointed(fn, layer, x, cos, sin, layout, heads, kv_heads, head_dim, fused,
                                 use_reentrant=False)
        else:
            x = fn(layer, x, cos, sin, layout, heads, kv_heads, head_dim, fused)
    return lm.model.norm(x)
