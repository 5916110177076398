"""Quantised weights in the Triton decode step (plugins/engines/triton_step.py): the w4
quantizer's INT4 projections (q|k|v and gate|up fused into shared buffers), its INT8 (or
INT4) lm_head and tied embedding, read by GEMV kernels that unpack in registers
(bluelm_v/nn/kernels/triton_decode.py: _gemv_q4_kernel, _gemv_q8_kernel, _embed_q_kernel).

    w = QWeight.of(module)          # None: not a quantised layer the kernels take
    step_weights(eng)               # per layer ((w_in, qkv, o, w_post, gu, down), eps) or None
    dequantized(model, dtype)       # the same model with every quantised layer as nn.Linear /
                                    # nn.Embedding of its dequantised weights (the reference path)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bluelm_v.nn.llama import RMSNORM_CLASSES
from bluelm_v.nn.quant_linear import Int4Linear, Int8Linear, QuantEmbedding, QuantLinearBase

from .fast_cpu import fuse_quantized


@dataclass(frozen=True)
class QWeight:
    """A quantised [n, k] weight as the kernels read it: bits 4 (codes uint8 [n, k/2], scales
    fp16 [n, k/group], zeros fp16 or None: symmetric) or 8 (codes int8 [n, k], scales fp32 [n])."""

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group: int
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @classmethod
    def of(cls, module) -> "QWeight | None":
        """The weight of an Int4Linear / Int8Linear / QuantEmbedding that the kernels can run
        as it is (no bias, fp32 activations, no hooks such as the a16 activation rounding)."""
        if isinstance(module, QuantEmbedding):
            n, k = module.num_embeddings, module.embedding_dim
        elif isinstance(module, QuantLinearBase):
            if module.bias is not None or module.act_dtype != "fp32" or module._forward_pre_hooks or \
                    module._forward_hooks:
                return None
            n, k = module.out_features, module.in_features
        else:
            return None
        if isinstance(module, Int4Linear) or getattr(module, "bits", 0) == 4:
            return cls(4, module.qweight, module.scales, module.zeros, module.group_size, n, k)
        if isinstance(module, Int8Linear) or getattr(module, "bits", 0) == 8:
            return cls(8, module.qweight, module.scale, None, 1, n, k)
        return None

    def fits(self, block_k: int) -> bool:
        """Whether a GEMV tile of block_k columns holds whole groups."""
        return self.bits == 8 or block_k % self.group == 0


def _projection(eng, i: int, module, names, fused_fp):
    """One layer's fused projection: the float weight, or a QWeight over fused INT4/INT8 buffers
    (the CPU path's fused module when it made one), else None."""
    if fused_fp is not None:
        return fused_fp[0] if fused_fp[1] is None else None
    cpu_layers = getattr(getattr(eng, "_cpu", None), "layers", None)
    fused = None
    if cpu_layers:                                  # fast_cpu fused these already: reuse
        made = cpu_layers[i][2 if names[0] == "q_proj" else 6]
        fused = made if isinstance(made, QuantLinearBase) else None
    if fused is None and eng.fuse:
        fused = fuse_quantized(module, names)
    return QWeight.of(fused) if fused is not None else None


def _weight(module):
    """A plain bias-free nn.Linear's weight or a QWeight, else None."""
    if type(module) is torch.nn.Linear:
        return module.weight if module.bias is None else None
    return QWeight.of(module)


def step_weights(eng) -> list | None:
    """Per layer ((w_in, qkv, o, w_post, gu, down), eps) with each projection a float weight or a
    QWeight, or None when some layer cannot run in the step (then the engine's torch step runs)."""
    out = []
    for i, layer in enumerate(eng.layers):
        a, m = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n).__name__ not in RMSNORM_CLASSES for n in norms) or \
                getattr(eng.model.config, "hidden_act", "silu") != "silu":
            return None
        qkv = _projection(eng, i, a, ("q_proj", "k_proj", "v_proj"), eng.qkv[i])
        gu = _projection(eng, i, m, ("gate_proj", "up_proj"), eng.gate_up[i])
        ws = (norms[0].weight, qkv, _weight(a.o_proj), norms[1].weight, gu, _weight(m.down_proj))
        if any(w is None for w in ws):
            return None
        out.append((ws, norms[0].variance_epsilon))
    return out


def dequantized(model, dtype=None):
    """``model`` (in place) with each quantised linear / embedding replaced by nn.Linear /
    nn.Embedding holding its dequantised weight in ``dtype`` (default: the model's norms'
    dtype); a tied head and embedding stay tied. Returns the model."""
    dtype = dtype or model.model.norm.weight.dtype
    tables = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinearBase):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  device=mod.qweight.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize(dtype=torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            tables[mod.qweight.data_ptr()] = lin.weight
            _set(model, name, lin)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantEmbedding):
            weight = tables.get(mod.qweight.data_ptr())
            emb = torch.nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx,
                                     device=mod.qweight.device, dtype=dtype)
            if weight is not None:
                emb.weight = weight                                   # tied
            else:
                with torch.no_grad():
                    emb.weight.copy_(mod(torch.arange(mod.num_embeddings, device=mod.qweight.device)))
            _set(model, name, emb)
    return model


def _set(root, name: str, module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def gemv_quant(eng, cfg, w: QWeight, x, out, prologue: int, epilogue: int, nw=None, eps: float = 0.0) -> None:
    """TritonDecodeEngine._gemv for a QWeight (same prologue/epilogue codes; no early head tiles:
    the first tile is loaded before the wait, each next one while the current is used)."""
    from bluelm_v.nn.kernels.triton_decode import _gemv_q4_kernel, _gemv_q8_kernel, triton

    n, k = w.shape
    if prologue == 1 and cfg.split_k != 1:
        raise ValueError("the fused RMSNorm needs split_k == 1")
    if not w.fits(cfg.block_k):
        raise ValueError(f"block_k {cfg.block_k} does not hold whole groups of {w.group}")
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    common = dict(K=k, K_PER=cfg.k_per_split(k), PROLOGUE=prologue, EPILOGUE=epilogue,
                  ROUND={torch.bfloat16: 1, torch.float16: 2}.get(eng.dtype, 0), BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, num_stages=cfg.num_stages, **eng._launch_opts(cfg.num_warps))
    nw = nw if nw is not None else x
    if w.bits == 4:
        _gemv_q4_kernel[grid](w.codes, w.scales, w.zeros if w.zeros is not None else w.scales, x, out, nw,
                              eng._part_idx, n, eps, GROUP=w.group, SYM=w.zeros is None, **common)
    else:
        _gemv_q8_kernel[grid](w.codes, w.scales, x, out, nw, eng._part_idx, n, eps, **common)


def embed_quant(eng, w: QWeight) -> None:
    """The token's row of a quantised embedding table -> eng._x (fp32)."""
    from bluelm_v.nn.kernels.triton_decode import _embed_q_kernel, triton

    _embed_q_kernel[(1,)](eng._tok, w.codes, w.scales, w.zeros if w.zeros is not None else w.scales, eng._x,
                          D=w.k, BITS=w.bits, GROUP=w.group, SYM=w.zeros is None,
                          BLOCK=triton.next_power_of_2(w.k), PDL=eng.pdl)
