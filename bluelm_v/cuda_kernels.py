"""Triton kernels of the CUDA decode step (bluelm_v/cuda_decode.py explains the step they make
up). Imported only where triton is installed; the names are None otherwise."""
from __future__ import annotations

try:  # optional: CI has no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _embed_kernel(tok_ptr, emb_ptr, x_ptr, D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        tok = tl.load(tok_ptr)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        tl.store(x_ptr + offs, tl.load(emb_ptr + tok * D + offs, mask=m).to(tl.float32), mask=m)

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, out_ptr, nw_ptr, idx_ptr, N, eps,
                     K: tl.constexpr, K_PER: tl.constexpr, PROLOGUE: tl.constexpr,
                     EPILOGUE: tl.constexpr, EVEN: tl.constexpr, ROUND: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                     PREFETCH: tl.constexpr):
        """y[rows] = W[rows, k-slice] @ xin[k-slice]. PROLOGUE 0: xin = x; 1: RMSNorm (xin =
        x*nw, y *= 1/rms(x)); 2: xin = silu(x[:K]) * x[K:]. EPILOGUE 0: store; 1: atomic add
        (residual, split-K); 2: per-block max/argmax of the logits -> out/idx[pid].
        PDL: start the next kernel early; only the first weight tile is read before waiting for
        the previous one. PREFETCH: the next weight tile is loaded before this one is used."""
        if PDL:
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        k_lo = pid_k * K_PER
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        ss = tl.zeros([BLOCK_K], tl.float32)
        w_rows = w_ptr + rows[:, None] * K
        ks = k_lo + tl.arange(0, BLOCK_K)
        if PREFETCH:
            if EVEN:
                w_cur = tl.load(w_rows + ks[None, :])
            else:
                w_cur = tl.load(w_rows + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
        if PDL:
            gdc_wait()
        for k0 in range(0, K_PER, BLOCK_K):
            ks = k_lo + k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            if PREFETCH:
                nks = ks + BLOCK_K
                more = k0 + BLOCK_K < K_PER
                if EVEN:
                    w_next = tl.load(w_rows + nks[None, :], mask=(nks < K)[None, :] & more, other=0.0)
                else:
                    w_next = tl.load(w_rows + nks[None, :], mask=rmask[:, None] & (nks < K)[None, :] & more,
                                     other=0.0)
                w = w_cur
            else:
                if EVEN:
                    w = tl.load(w_rows + ks[None, :])
                else:
                    w = tl.load(w_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            if PROLOGUE == 0:
                xv = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            elif PROLOGUE == 1:
                xr = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
                ss += xr * xr
                xv = xr * tl.load(nw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            else:
                g = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + ks, mask=kmask, other=0.0).to(tl.float32)
                xv = g * tl.sigmoid(g) * u
            acc += w.to(tl.float32) * xv[None, :]
            if PREFETCH:
                w_cur = w_next
        y = tl.sum(acc, 1)
        if PROLOGUE == 1:
            y = y * tl.rsqrt(tl.sum(ss, 0) / K + eps)
        if EPILOGUE == 0:
            tl.store(out_ptr + rows, y, mask=rmask)
        elif EPILOGUE == 1:
            tl.atomic_add(out_ptr + rows, y, mask=rmask, sem="relaxed")
        else:
            if ROUND == 1:     # compare logits as the reference does: in the model dtype
                y = y.to(tl.bfloat16).to(tl.float32)
            elif ROUND == 2:
                y = y.to(tl.float16).to(tl.float32)
            v = tl.where(rmask, y, float("-inf"))
            mx = tl.max(v, 0)
            best = tl.min(tl.where(v == mx, rows, 2147483647), 0)
            tl.store(out_ptr + pid_n, mx)
            tl.store(idx_ptr + pid_n, best)

    @triton.jit
    def _attn_kernel(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, opart_ptr, ml_ptr,
                     qk_scale, S, H: tl.constexpr, KV: tl.constexpr, HEAD_D: tl.constexpr,
                     NSPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program (head h, split sp): RoPE of q and the new k, cache write of the new k/v (sp 0,
        first head of its group), softmax (base 2) over keys [sp*BLOCK, sp*BLOCK+BLOCK) <= pos
        in one shot (row pos taken from registers) -> unnormalised o, max m, sum l."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        h = tl.program_id(0)
        sp = tl.program_id(1)
        G: tl.constexpr = H // KV
        kvh = h // G
        pos = tl.load(pos_ptr).to(tl.int32)
        start = sp * BLOCK
        if start <= pos:
            dims = tl.arange(0, HEAD_D)
            rot = (dims + HEAD_D // 2) % HEAD_D
            head_off = kvh * S * HEAD_D
            offs = start + tl.arange(0, BLOCK)
            valid = offs <= pos
            ptrs = head_off + offs[:, None] * HEAD_D + dims[None, :]
            kt = tl.load(kc_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)     # [BLOCK,d]
            vt = tl.load(vc_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
            c = tl.load(cos_ptr + pos * HEAD_D + dims).to(tl.float32)
            sn = tl.load(sin_ptr + pos * HEAD_D + dims).to(tl.float32)
            q = tl.load(qkv_ptr + h * HEAD_D + dims) * c + tl.load(qkv_ptr + h * HEAD_D + rot) * sn
            q = q * qk_scale
            ko = (H + kvh) * HEAD_D
            vo = (H + KV + kvh) * HEAD_D
            k_new = (tl.load(qkv_ptr + ko + dims) * c + tl.load(qkv_ptr + ko + rot) * sn)
            k_new = k_new.to(kc_ptr.dtype.element_ty)
            v_new = tl.load(qkv_ptr + vo + dims).to(vc_ptr.dtype.element_ty)
            if (sp == 0) & (h % G == 0):
                tl.store(kc_ptr + head_off + pos * HEAD_D + dims, k_new)
                tl.store(vc_ptr + head_off + pos * HEAD_D + dims, v_new)
            is_new = (offs == pos)[:, None]
            kt = tl.where(is_new, k_new.to(tl.float32)[None, :], kt)      # row pos: this step's k/v
            vt = tl.where(is_new, v_new.to(tl.float32)[None, :], vt)
            sc = tl.where(valid, tl.sum(kt * q[None, :], 1), float("-inf"))        # [BLOCK]
            m = tl.max(sc, 0)
            p = tl.exp2(sc - m)
            slot = h * NSPLIT + sp
            tl.store(opart_ptr + slot * HEAD_D + dims, tl.sum(p[:, None] * vt, 0))
            tl.store(ml_ptr + slot * 2, m)
            tl.store(ml_ptr + slot * 2 + 1, tl.sum(p, 0))

    @triton.jit
    def _merge_kernel(opart_ptr, ml_ptr, pos_ptr, out_ptr, HEAD_D: tl.constexpr, NSPLIT: tl.constexpr,
                      NS_P2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program h: merge head h's split partials -> out[h*d:(h+1)*d] (fp32)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        h = tl.program_id(0)
        pos = tl.load(pos_ptr).to(tl.int32)
        s_idx = tl.arange(0, NS_P2)
        ok = (s_idx < NSPLIT) & (s_idx * BLOCK <= pos)
        dims = tl.arange(0, HEAD_D)
        m = tl.load(ml_ptr + (h * NSPLIT + s_idx) * 2, mask=ok, other=float("-inf"))
        lsum = tl.load(ml_ptr + (h * NSPLIT + s_idx) * 2 + 1, mask=ok, other=0.0)
        o = tl.load(opart_ptr + (h * NSPLIT + s_idx)[:, None] * HEAD_D + dims[None, :], mask=ok[:, None],
                    other=0.0)
        wgt = tl.where(ok, tl.exp2(m - tl.max(m, 0)), 0.0)
        tl.store(out_ptr + h * HEAD_D + dims, tl.sum(wgt[:, None] * o, 0) / tl.sum(wgt * lsum, 0))

    @triton.jit
    def _argmax_kernel(val_ptr, idx_ptr, n, tok_ptr, next_ptr, pos_ptr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        offs = tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(val_ptr + offs, mask=m, other=float("-inf"))
        i = tl.load(idx_ptr + offs, mask=m, other=2147483647)
        best = tl.min(tl.where(v == tl.max(v, 0), i, 2147483647), 0).to(tl.int64)
        tl.store(tok_ptr, best)
        tl.store(next_ptr, best)
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
else:  # pragma: no cover - the names exist without triton
    _embed_kernel = _gemv_kernel = _attn_kernel = _merge_kernel = _argmax_kernel = None
