"""FastLlamaEngine's CPU forward: a decoder layer in ~8 calls (bluelm_v.nn.kernels.cpu_layer_ops + GEMMs).

Per layer, for a chunk of T rows at positions start..start+T-1 (T = 128 in prefill, 1 at decode):
    rmsnorm (C) -> qkv projection (one fused weight: fp32 GEMM or one quantised C kernel)
    -> rope_qkv (C: RoPE of q and k, q grouped per KV head, k/v written into the static cache)
    -> attention: T > 1  torch's flash attention over the cached prefix (no mask) and over the
                         chunk itself (a causal mask built ONCE per chunk, shared by all layers),
                         merged by log-sum-exp; T == 1  attn_decode (C), over an fp16
                         mirror of the cache (half the bytes a step; ``cpu_half_kv``)
    -> o projection + residual -> rmsnorm (C) -> gate|up projection -> silu_mul (C)
    -> down projection + residual
Quantised q/k/v (and gate/up) modules of one layer are fused the same way the fp32 ones are:
one module over concatenated buffers, the original modules' buffers become views of it (no
memory added), so a w4 decode step is 4 kernel launches per layer, not 7.
Used when the engine runs fp32 on CPU with the fp32 static cache and the helpers could be built;
everything else takes the generic path in fast.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bluelm_v.nn.fusion import hooked
from bluelm_v.nn.kernels import cpu_layer_ops
from bluelm_v.nn.llama import RMSNORM_CLASSES


def fuse_quantized(module, names):
    """One quantised linear over the named modules' concatenated buffers (their buffers become
    views of it), or None when they are not all quantised the same way."""
    try:
        from bluelm_v.nn.quant_linear import Int4Linear, Int8Linear
    except ImportError:
        return None
    mods = [getattr(module, n, None) for n in names]
    kind = type(mods[0])
    if kind not in (Int4Linear, Int8Linear) or any(type(m) is not kind for m in mods):
        return None
    m0 = mods[0]
    same = ("in_features", "kernel", "act_dtype") + (("group_size", "symmetric") if kind is Int4Linear else ())
    if any(getattr(m, a) != getattr(m0, a) for m in mods for a in same):
        return None
    if any((m.bias is None) != (m0.bias is None) for m in mods):
        return None
    n = sum(m.out_features for m in mods)
    extra = dict(group_size=m0.group_size, symmetric=m0.symmetric) if kind is Int4Linear else {}
    fused = kind(m0.in_features, n, bias=m0.bias is not None, kernel=m0.kernel, act_dtype=m0.act_dtype,
                 device="meta", **extra)
    with torch.no_grad():
        for name in list(m0._buffers):
            if m0._buffers[name] is None:
                continue
            whole = torch.cat([m._buffers[name] for m in mods])                # [sum(N), ...]
            fused._buffers[name] = whole
            start = 0
            for m in mods:
                m._buffers[name] = whole[start:start + m.out_features]
                start += m.out_features
        if m0.bias is not None:
            whole = torch.cat([m.bias.detach() for m in mods])
            fused.bias = torch.nn.Parameter(whole, requires_grad=False)
            start = 0
            for m in mods:
                m.bias = torch.nn.Parameter(whole[start:start + m.out_features], requires_grad=False)
                start += m.out_features
    for m in mods:
        m.__dict__.pop("_ptr_cache", None)
        m._device_kernels.clear()
    return fused


def direct_matvec(mod):
    """For a bias-free INT4/INT8 linear on the C kernels: f(x_ptr, y_ptr, add_ptr, threads) computing
    y[N] = x[K] @ W.T + add[N] (add may be y itself: an in-place residual), else None."""
    from bluelm_v.nn.kernels import cpu_quant
    from bluelm_v.nn.quant_linear import FUSED_DECODE, Int4Linear, Int8Linear

    qlib = cpu_quant.library()
    if qlib is None or type(mod) not in (Int4Linear, Int8Linear) or mod.kernel not in FUSED_DECODE or \
            mod.act_dtype != "fp32" or hooked(mod) or not mod._fused_ok or mod.bias is not None or \
            mod.qweight.device.type != "cpu":
        return None
    k, n, q = mod.in_features, mod.out_features, mod.qweight.data_ptr()
    if type(mod) is Int4Linear:
        s, g = mod.scales.data_ptr(), mod.group_size
        z = None if mod.zeros is None else mod.zeros.data_ptr()
        q8 = mod._q8(1)
        if q8 is not None:                       # int8-rounded activations, integer dot products
            return lambda xp, yp, ap, nt: q8(xp, k, q, s, z, ap, n, g, yp, nt)
        f4 = qlib.int4_gemm_small
        return lambda xp, yp, ap, nt: f4(xp, 1, k, q, s, z, ap, n, g, yp, nt)
    s, f8 = mod.scale.data_ptr(), qlib.int8_gemm_small
    return lambda xp, yp, ap, nt: f8(xp, 1, k, q, s, ap, n, yp, nt)


def chunk_attention(q, kc, vc, start: int, t: int, diag_mask, scale: float):
    """Attention of a chunk's queries q [1, KV, g*T, d] (rows (group, t)) over cache rows
    [0, start + T) of kc/vc [1, KV, S, d]: the prefix [0, start) unmasked and the chunk's own
    rows under the causal ``diag_mask`` [g*T, T], as two flash calls merged by their
    log-sum-exp (the masked part stays T wide instead of start + T) -> [1, KV, g*T, d]."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    end = start + t
    if start == 0 or flash is None:          # one masked call (the prefix columns unmasked)
        mask = torch.cat([diag_mask.new_zeros(diag_mask.shape[0], start), diag_mask], 1)   # [gT, start+T]
        return F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask,
                                              scale=scale).contiguous()
    o_pre, lse_pre = flash(q, kc[:, :, :start], vc[:, :, :start], scale=scale)          # [1,KV,gT,d], [1,KV,gT]
    o_own, lse_own = flash(q, kc[:, :, start:end], vc[:, :, start:end], attn_mask=diag_mask, scale=scale)
    top = torch.maximum(lse_pre, lse_own)
    w_pre, w_own = (lse_pre - top).exp_()[..., None], (lse_own - top).exp_()[..., None]   # [1,KV,gT,1]
    return (o_pre * w_pre + o_own * w_own).div_(w_pre + w_own).contiguous()      # ungroup reads it raw


class CpuPath:
    """The per-layer callables and buffers of the CPU forward (see the module docstring)."""

    def __init__(self, eng):
        self.eng, self.lib = eng, cpu_layer_ops.library()
        self.layers = []
        for i, layer in enumerate(eng.layers):
            a, m = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(type(n).__name__ not in RMSNORM_CLASSES for n in norms) or \
                    getattr(eng.model.config, "hidden_act", "silu") != "silu":
                self.layers = None
                return
            qkv = self._projection(eng.qkv[i], a, ("q_proj", "k_proj", "v_proj"), eng.fuse)
            gu = self._projection(eng.gate_up[i], m, ("gate_proj", "up_proj"), eng.fuse)
            if qkv is None or gu is None:
                self.layers = None
                return
            self.layers.append((norms[0].weight, norms[0].variance_epsilon, qkv, a.o_proj,
                                norms[1].weight, norms[1].variance_epsilon, gu, m.down_proj))
        self._scratch = torch.empty(0)
        self._direct = None               # per layer: direct decode calls, or [] / None
        self.half_kv = eng.cpu_half_kv and self.lib is not None and self.lib.has_fast_f16() == 1
        self._half, self._synced = None, 0   # fp16 mirror of the cache for decode; rows mirrored

    def _decode_kv(self, start: int):
        """Per layer (k, v) pointers for decode attention at row ``start``: an fp16 mirror of
        the fp32 cache (prefill keeps using the fp32 one), brought up to row start here, or None
        (fp32 attn_decode). Keys [L, KV, S/16, d, 16] (blocks of 16 keys, transposed), values
        [L, KV, S, d]; the C kernel adds row start itself."""
        k, v = self.eng.cache.k, self.eng.cache.v                     # [L, KV, S, d]
        n_l, kv, s, d = k.shape
        if not self.half_kv or s % 16:
            return None
        if self._half is None or self._half[1].shape != k.shape:
            self._half = (torch.empty(n_l, kv, s // 16, d, 16, dtype=torch.float16),
                          torch.empty(k.shape, dtype=torch.float16))
            self._synced = 0
        kb, vh = self._half
        if self._synced < start:                                      # the prompt, once
            b0, b1 = self._synced // 16, -(-start // 16)              # whole blocks (same values)
            kb[:, :, b0:b1] = k[:, :, b0 * 16:b1 * 16].unflatten(2, (b1 - b0, 16)).transpose(-1, -2)
            vh[:, :, self._synced:start] = v[:, :, self._synced:start]
        self._synced = start + 1
        return [(kb[i].data_ptr(), vh[i].data_ptr()) for i in range(n_l)]

    def mirrored_keys(self) -> torch.Tensor:
        """[L, KV, S, d] fp16 keys of the decode mirror in the cache's layout (for tests)."""
        kb = self._half[0]
        return kb.transpose(-1, -2).flatten(2, 3)

    def refresh(self) -> None:
        """(Re)bind the decode step's direct kernel calls to the current weight buffers."""
        self._direct = []
        if self.layers is None:
            return
        for (_, _, qkv, o_proj, _, _, gu, down) in self.layers:
            fns = [direct_matvec(m) for m in (qkv, o_proj, gu, down)]
            if any(f is None for f in fns):
                self._direct = []             # not all quantised: the general path
                return
            self._direct.append((fns, qkv.out_features, gu.out_features))

    @staticmethod
    def _projection(fused_fp, module, names, fuse: bool = True):
        """x [T, K] -> [T, sum(N)] for the named projections, with one weight where possible
        (quantised ones are fused into shared buffers only when the engine fuses)."""
        mods = [getattr(module, n) for n in names]
        if any(hooked(m) for m in mods):
            return lambda x: torch.cat([m(x) for m in mods], -1)
        if fused_fp is not None:
            weight, bias = fused_fp
            if bias is None and weight.dtype == torch.float32 and weight.is_contiguous():
                return lambda x: cpu_layer_ops.linear(x, weight)
            return lambda x: F.linear(x, weight, bias)
        q = fuse_quantized(module, names) if fuse else None
        if q is not None:
            return q
        return lambda x: torch.cat([m(x) for m in mods], -1)

    @property
    def usable(self) -> bool:
        eng = self.eng
        cache = eng.cache
        return self.lib is not None and self.layers is not None and eng.device.type == "cpu" and \
            eng.dtype == torch.float32 and type(cache).__name__ == "KVCache" and \
            cache.k.dtype == torch.float32 and eng.attention == "sdpa" and eng.head_dim <= cpu_layer_ops.MAX_HEAD_DIM and \
            eng.n_heads // eng.n_kv <= cpu_layer_ops.MAX_GROUP and \
            eng.cos.is_contiguous() and eng.sin_signed.is_contiguous()

    @staticmethod
    def _out_proj(module, x_in, residual):
        """residual + module(x_in); a plain bias-free fp32 Linear through cpu_layer_ops.linear."""
        if type(module) is torch.nn.Linear and module.bias is None and not hooked(module) and \
                module.weight.dtype == torch.float32 and module.weight.is_contiguous():
            return cpu_layer_ops.linear(x_in, module.weight).add_(residual)
        return residual + module(x_in)

    def forward(self, x, start: int, decode: bool = False):
        """x [T, D] fp32 at positions start.. -> [T, D] hidden states after the last layer
        (``decode``: a generation step, attention over the fp16 mirror when it is on)."""
        eng, lib = self.eng, self.lib
        t, d, big = x.shape[0], eng.head_dim, x.shape[1]
        self._synced = min(self._synced, start)   # rows from start on are (re)written now
        if start == 0 or self._direct is None:
            self.refresh()                # a new sequence: rebind to the current buffers
        if t == 1 and self._direct:
            return self._decode_direct(x, start, decode)
        heads, kv, g = eng.n_heads, eng.n_kv, eng.n_heads // eng.n_kv
        s, kv_len, threads = eng.cache.max_len, start + t, torch.get_num_threads()
        cos, sin_s = eng.cos[start:], eng.sin_signed[start:]
        mask = None
        if t > 1:   # additive, rows (group, t): causal within the chunk (the prefix needs none)
            mask = torch.full((t, t), float("-inf")).triu_(1).repeat(g, 1)  # [g*T, T]
        else:
            need = threads * heads * (d + 2) + g * kv_len
            if self._scratch.numel() < need:
                self._scratch = torch.empty(max(need, threads * heads * (d + 2) + g * s))
        half = self._decode_kv(start) if t == 1 and decode else None
        h = torch.empty_like(x)
        q = torch.empty(kv, g * t, d)                                       # [KV, g*T, d]
        o = torch.empty(t, heads * d)
        act = None
        for i, (w_in, eps_in, qkv_fn, o_proj, w_post, eps_post, gu_fn, down) in enumerate(self.layers):
            kc, vc = eng.cache.k[i], eng.cache.v[i]                        # [KV, S, d]
            lib.rmsnorm(x.data_ptr(), t, big, w_in.data_ptr(), eps_in, h.data_ptr(), threads)
            qkv = qkv_fn(h)                                                 # [T, (H+2KV)d]
            if not qkv.is_contiguous():
                qkv = qkv.contiguous()
            lib.rope_qkv(qkv.data_ptr(), t, heads, kv, d, cos.data_ptr(), sin_s.data_ptr(), q.data_ptr(),
                         kc.data_ptr(), vc.data_ptr(), s, start, threads)
            if half:
                lib.attn_decode_f16(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), *half[i], heads, kv, d, s,
                                    kv_len, eng.scaling, o.data_ptr(), self._scratch.data_ptr(), threads)
            elif t == 1:
                lib.attn_decode(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), heads, kv, d, s, kv_len,
                                eng.scaling, o.data_ptr(), self._scratch.data_ptr(), threads)
            else:
                og = chunk_attention(q[None], kc[None], vc[None], start, t, mask, eng.scaling)  # [1,KV,gT,d]
                lib.ungroup(og.data_ptr(), t, heads, kv, d, o.data_ptr())
            x = self._out_proj(o_proj, o, x)                                # [T, D]
            lib.rmsnorm(x.data_ptr(), t, big, w_post.data_ptr(), eps_post, h.data_ptr(), threads)
            gu = gu_fn(h)                                                   # [T, 2F]
            if not gu.is_contiguous():
                gu = gu.contiguous()
            f = gu.shape[1] // 2
            if act is None or act.shape[1] != f:
                act = torch.empty(t, f)
            lib.silu_mul(gu.data_ptr(), t, f, act.data_ptr(), threads)
            x = self._out_proj(down, act, x)
        return x

    def _decode_direct(self, x, start: int, decode: bool = True):
        """One token through all layers with quantised projections: 9 C calls per layer, no torch
        op; the residual adds happen inside the o/down kernels (x is updated in place)."""
        eng, lib = self.eng, self.lib
        d, big, heads, kv = eng.head_dim, x.shape[1], eng.n_heads, eng.n_kv
        s, kv_len, nt = eng.cache.max_len, start + 1, torch.get_num_threads()
        need = nt * heads * (d + 2) + heads // kv * s
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        x = x.clone()                                            # [1, D], updated in place
        h, q, o = torch.empty_like(x), torch.empty(heads, d), torch.empty(1, heads * d)
        width = max(n for _, n, _ in self._direct)
        qkv, gu = torch.empty(width), torch.empty(max(n for _, _, n in self._direct))
        act = torch.empty(gu.numel() // 2)
        xp, hp, qp, op, qkvp, gup, actp = (x.data_ptr(), h.data_ptr(), q.data_ptr(), o.data_ptr(),
                                           qkv.data_ptr(), gu.data_ptr(), act.data_ptr())
        cos = eng.cos[start].data_ptr()
        sin_s = eng.sin_signed[start].data_ptr()
        scratch = self._scratch.data_ptr()
        half = self._decode_kv(start) if decode else None
        for i, ((f_qkv, f_o, f_gu, f_down), _, n_gu) in enumerate(self._direct):
            w_in, eps_in, _, _, w_post, eps_post, _, _ = self.layers[i]
            kc, vc = eng.cache.k[i].data_ptr(), eng.cache.v[i].data_ptr()
            lib.rmsnorm(xp, 1, big, w_in.data_ptr(), eps_in, hp, nt)
            f_qkv(hp, qkvp, None, nt)
            lib.rope_qkv(qkvp, 1, heads, kv, d, cos, sin_s, qp, kc, vc, s, start, nt)
            if half:
                lib.attn_decode_f16(qp, kc, vc, *half[i], heads, kv, d, s, kv_len, eng.scaling, op, scratch, nt)
            else:
                lib.attn_decode(qp, kc, vc, heads, kv, d, s, kv_len, eng.scaling, op, scratch, nt)
            f_o(op, xp, xp, nt)                                  # x += o @ Wo.T
            lib.rmsnorm(xp, 1, big, w_post.data_ptr(), eps_post, hp, nt)
            f_gu(hp, gup, None, nt)
            lib.silu_mul(gup, 1, n_gu // 2, actp, nt)
            f_down(actp, xp, xp, nt)                             # x += silu(g)*u @ Wd.T
        return x
