"""Fast inference path of the SigLIP tower (the ``siglip`` encoder's ``fused`` / ``compile`` /
``cuda_graph`` / ``fp8`` / ``attention`` options, plugins/encoders.py):

  * q|k|v fused IN PLACE into one weight per layer (bluelm_v.nn.fusion: one GEMM, no memory
    added), the layer as one function over raw tensors (``siglip_layer``), which is what
    ``torch.compile`` compiles once and every layer reuses (LayerNorm, bias, GELU and
    residual adds fused around the GEMMs)
  * attention by a chosen scaled_dot_product_attention backend (flash, cuDNN, efficient, math)
  * FP8 (e4m3) matmuls: weights quantised once per output channel, activations per token at
    each call, rowwise-scaled ``torch._scaled_mm`` on CUDA (sm89+); the same maths in fp32 on
    CPU (for tests). The patch embedding and attention stay in the model dtype.
  * ``GraphedRunner``: one CUDA graph per input shape (tile count), input copied in, output
    copied out.
Layers whose projections are not plain nn.Linear (a quantizer replaced them) run their modules.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .fusion import fuse_linears, hooked

FP8_MAX = 448.0                           # largest finite float8_e4m3fn
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N,K] -> (e4m3 [N,K], fp32 scale [N]) with w ~= scale[:, None] * q, per row."""
    scale = (w.detach().float().abs().amax(-1) / FP8_MAX).clamp_(min=1e-12)             # [N]
    return (w.detach().float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """x [..., K] @ (w_scale * w8).T + bias in FP8: x quantised per token (row), e4m3 GEMM with
    fp32 accumulation (CUDA: torch._scaled_mm) -> [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                                         # [M,K]
    x_scale = (x2.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp_(min=1e-12)      # [M,1]
    xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
    if x.is_cuda:
        y = torch._scaled_mm(xq, w8.t(), scale_a=x_scale, scale_b=w_scale[None], out_dtype=torch.bfloat16)
    else:                                       # the same products, dequantised, in fp32
        y = (xq.float() * x_scale) @ (w8.float() * w_scale[:, None]).t()
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], w8.shape[0])


def project(x, w: tuple):
    """x @ one projection: (weight, bias) in the model dtype or (e4m3 weight, scales, bias)."""
    if len(w) == 2:
        return F.linear(x, w[0], w[1])
    return fp8_linear(x, *w)


def siglip_layer(x, ln1, qkv, o, ln2, fc1, fc2, *, heads: int, eps: float):
    """One SigLIP encoder layer from raw tensors: x [k,T,C]; ln1/ln2 (weight, bias); qkv, o,
    fc1, fc2 projections (see ``project``) -> [k,T,C]."""
    k, t, c = x.shape
    h = F.layer_norm(x, (c,), ln1[0], ln1[1], eps)
    q, kk, v = project(h, qkv).view(k, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)   # [k,H,T,d]
    a = F.scaled_dot_product_attention(q, kk, v)                                                    # [k,H,T,d]
    x = x + project(a.transpose(1, 2).reshape(k, t, c), o)
    h = F.layer_norm(x, (c,), ln2[0], ln2[1], eps)
    return x + project(F.gelu(project(h, fc1), approximate="tanh"), fc2)


def attention_backend(name: str):
    """A context selecting the scaled_dot_product_attention backend (``auto``: torch's choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def layer_weights(layer, fp8: bool):
    """A SigLIP layer's raw weights for ``siglip_layer`` (q|k|v fused in place on first use; the
    fused and FP8 tensors kept as non-persistent buffers of the layer, so freeing the encoder's
    buffers frees them), or None when its projections are not plain, hook-free nn.Linear (a
    quantizer's layers, a16 activation rounding: the layer's modules run)."""
    attn, mlp = layer.self_attn, layer.mlp
    lins = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2)
    if any(type(m) is not torch.nn.Linear or m.bias is None or hooked(m) for m in lins):
        for name in [n for n in layer._buffers if n.startswith("fast_")]:
            del layer._buffers[name]                     # stale: the layer was quantised since
        return None
    fused = layer._buffers.get("fast_qkv_weight")
    if fused is None or fused.data_ptr() != attn.q_proj.weight.data_ptr() or fused.numel() == 0:
        w, b = fuse_linears(attn, ("q_proj", "k_proj", "v_proj"))              # [3C, C], [3C]
        layer.register_buffer("fast_qkv_weight", w, persistent=False)
        layer.register_buffer("fast_qkv_bias", b, persistent=False)
        for name in [n for n in layer._buffers if n.startswith("fast_fp8")]:
            del layer._buffers[name]
    plain = {"qkv": (layer.fast_qkv_weight, layer.fast_qkv_bias), "o": (attn.out_proj.weight, attn.out_proj.bias),
             "fc1": (mlp.fc1.weight, mlp.fc1.bias), "fc2": (mlp.fc2.weight, mlp.fc2.bias)}
    if fp8:
        versions = tuple(w._version for w, _ in plain.values())    # weights written since (a load)?
        if layer.__dict__.get("_fast_fp8_versions") != versions:
            for name in [n for n in layer._buffers if n.startswith("fast_fp8")]:
                del layer._buffers[name]
            layer.__dict__["_fast_fp8_versions"] = versions
        for key, (w, b) in plain.items():
            if f"fast_fp8_{key}" not in layer._buffers:
                q, s = quantize_fp8_rows(w)
                layer.register_buffer(f"fast_fp8_{key}", q, persistent=False)
                layer.register_buffer(f"fast_fp8_{key}_scale", s, persistent=False)
            plain[key] = (layer._buffers[f"fast_fp8_{key}"], layer._buffers[f"fast_fp8_{key}_scale"], b)
    return ((layer.layer_norm1.weight, layer.layer_norm1.bias), plain["qkv"], plain["o"],
            (layer.layer_norm2.weight, layer.layer_norm2.bias), plain["fc1"], plain["fc2"])


class GraphedRunner:
    """fn(x) replayed as one CUDA graph per input shape/dtype (captured at first sight; all
    graphs share one memory pool: they never run at the same time). The result is a copy."""

    def __init__(self, fn):
        self.fn, self.graphs, self.pool = fn, {}, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self.graphs.get(key)
        if entry is None:
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):                      # warm-up: compile, cuBLAS workspaces
                    self.fn(static_in)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = self.fn(static_in)
            entry = self.graphs[key] = (graph, static_in, static_out)
        entry[1].copy_(x)
        entry[0].replay()
        return entry[2].clone()
