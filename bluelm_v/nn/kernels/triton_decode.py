"""Triton kernels of the CUDA decode step (plugins/engines/triton_step.py explains the step they make
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
    def _x_load(x_ptr, nw_ptr, ks, kmask, K: tl.constexpr, PROLOGUE: tl.constexpr):
        """The raw GEMV inputs at columns ks (through L2: the previous kernel wrote them):
        PROLOGUE 0: (x, -); 1: (x, norm weight); 2: (gate, up) = (x[:K], x[K:])."""
        a = tl.load(x_ptr + ks, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        if PROLOGUE == 1:
            b = tl.load(nw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        elif PROLOGUE == 2:
            b = tl.load(x_ptr + K + ks, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        else:
            b = a
        return a, b

    @triton.jit
    def _x_apply(a, b, PROLOGUE: tl.constexpr):
        """(GEMV input, its contribution to the sum of squares for the RMSNorm) from _x_load's
        pair: 0: x; 1: x*nw (squares of x); 2: silu(gate) * up."""
        if PROLOGUE == 1:
            return a * b, a * a
        if PROLOGUE == 2:
            return a * tl.sigmoid(a) * b, a * 0.0
        return a, a * 0.0

    @triton.jit
    def _w_tile(w_rows, ks, rmask, ok, K: tl.constexpr, EVEN: tl.constexpr):
        """Weight tile [BLOCK_N, len(ks)] at columns ks (zeros past K, or all zeros unless the
        scalar ok: a tile past the split), read once: evict_first. EVEN: rows and K whole, so
        the mask is uniform along the row (16-byte loads)."""
        if EVEN:
            return tl.load(w_rows + ks[None, :], mask=(ks < K)[None, :] & ok, other=0.0,
                           eviction_policy="evict_first")
        return tl.load(w_rows + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :] & ok, other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, out_ptr, nw_ptr, idx_ptr, N, eps,
                     K: tl.constexpr, K_PER: tl.constexpr, PROLOGUE: tl.constexpr,
                     EPILOGUE: tl.constexpr, EVEN: tl.constexpr, ROUND: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                     PREFETCH: tl.constexpr, HEAD_K: tl.constexpr):
        """y[rows] = W[rows, k-slice] @ xin[k-slice]. PROLOGUE (see _x_apply): 0 x, 1 RMSNorm
        (xin = x*nw, y *= 1/rms(x)), 2 SiLU(gate)*up. EPILOGUE 0: store; 1: atomic add (residual,
        split-K); 2: per-block max/argmax of the logits -> out/idx[pid].
        The first HEAD_K columns of the slice (a power of two <= K_PER) are loaded before waiting
        on the previous kernel (PDL: this kernel starts while that one drains; weights do not
        depend on it); the rest streams BLOCK_K at a time with PREFETCH (0-2) weight tiles in
        flight ahead of the one being used (the first of them also loaded before the wait) and,
        with PREFETCH, the next tile's inputs too (their L2 latency off the critical path)."""
        if PDL:
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        k_lo = pid_k * K_PER
        w_rows = w_ptr + rows[:, None] * K
        hk = k_lo + tl.arange(0, HEAD_K)                                        # head columns
        hmask = hk < K
        w_head = _w_tile(w_rows, hk, rmask, True, K, EVEN)                      # [BLOCK_N, HEAD_K]
        tile = tl.arange(0, BLOCK_K)
        if PREFETCH >= 1:                                                        # first tiles after the head
            w_cur = _w_tile(w_rows, k_lo + HEAD_K + tile, rmask, True, K, EVEN)
        if PDL:
            gdc_wait()
        if PREFETCH >= 2:
            w_nxt = _w_tile(w_rows, k_lo + HEAD_K + BLOCK_K + tile, rmask, True, K, EVEN)
        xa, xb = _x_load(x_ptr, nw_ptr, hk, hmask, K, PROLOGUE)
        if PREFETCH >= 1:
            ks = k_lo + HEAD_K + tile
            xa_cur, xb_cur = _x_load(x_ptr, nw_ptr, ks, ks < K, K, PROLOGUE)
        xh, sqh = _x_apply(xa, xb, PROLOGUE)
        y = tl.sum(w_head.to(tl.float32) * xh[None, :], 1)                      # [BLOCK_N]
        ss = tl.sum(sqh, 0)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sq_acc = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(HEAD_K, K_PER, BLOCK_K):
            ks = k_lo + k0 + tile
            kmask = ks < K
            if PREFETCH >= 1:
                w_new = _w_tile(w_rows, ks + PREFETCH * BLOCK_K, rmask, k0 + PREFETCH * BLOCK_K < K_PER, K, EVEN)
                w = w_cur
                nks = ks + BLOCK_K
                xa_new, xb_new = _x_load(x_ptr, nw_ptr, nks, (nks < K) & (k0 + BLOCK_K < K_PER), K, PROLOGUE)
                xv, sq = _x_apply(xa_cur, xb_cur, PROLOGUE)
                xa_cur, xb_cur = xa_new, xb_new
            else:
                w = _w_tile(w_rows, ks, rmask, True, K, EVEN)
                la, lb = _x_load(x_ptr, nw_ptr, ks, kmask, K, PROLOGUE)
                xv, sq = _x_apply(la, lb, PROLOGUE)
            sq_acc += sq
            acc += w.to(tl.float32) * xv[None, :]
            if PREFETCH == 1:
                w_cur = w_new
            elif PREFETCH == 2:
                w_cur = w_nxt
                w_nxt = w_new
        y += tl.sum(acc, 1)
        if PROLOGUE == 1:
            y = y * tl.rsqrt((ss + tl.sum(sq_acc, 0)) / K + eps)
        _gemv_out(y, rows, rmask, out_ptr, idx_ptr, pid_n, EPILOGUE, ROUND)

    @triton.jit
    def _gemv_out(y, rows, rmask, out_ptr, idx_ptr, pid_n, EPILOGUE: tl.constexpr, ROUND: tl.constexpr):
        """A GEMV block's rows y [BLOCK_N]: EPILOGUE 0 store; 1 atomic add (residual, split-K);
        2 the block's max/argmax of the logits -> out/idx[pid_n]."""
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
    def _q4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, k0, ok, K: tl.constexpr, GROUP: tl.constexpr,
                 SYM: tl.constexpr, BLOCK_K: tl.constexpr):
        """INT4 weight tile at columns [k0, k0+BLOCK_K): packed codes uint8 [BLOCK_N, BLOCK_K/2]
        (low nibble = even column) and its groups' scales (and zeros) [BLOCK_N, BLOCK_K/GROUP];
        all zeros unless the scalar ok (a tile past the split). Read once: evict_first."""
        bcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        w = tl.load(q_ptr + rows[:, None] * (K // 2) + bcols[None, :],
                    mask=rmask[:, None] & (bcols < K // 2)[None, :] & ok, other=0, eviction_policy="evict_first")
        gcols = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        gmask = rmask[:, None] & (gcols < K // GROUP)[None, :] & ok
        goffs = rows[:, None] * (K // GROUP) + gcols[None, :]
        s = tl.load(s_ptr + goffs, mask=gmask, other=0.0, eviction_policy="evict_first")
        if SYM:
            z = s
        else:
            z = tl.load(z_ptr + goffs, mask=gmask, other=0.0, eviction_policy="evict_first")
        return w, s, z

    @triton.jit
    def _q4_dot(w, s, z, x_ptr, nw_ptr, k0, K: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                PROLOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(rows . inputs over the tile [BLOCK_N], squares of the raw inputs [BLOCK_K/2]): codes
        times inputs summed per group first, then scaled (w = s*(q-8), or s*q + z)."""
        ke = k0 + 2 * tl.arange(0, BLOCK_K // 2)                                 # even columns
        a_e, b_e = _x_load(x_ptr, nw_ptr, ke, ke < K, K, PROLOGUE)
        a_o, b_o = _x_load(x_ptr, nw_ptr, ke + 1, ke + 1 < K, K, PROLOGUE)
        xe, sq_e = _x_apply(a_e, b_e, PROLOGUE)
        xo, sq_o = _x_apply(a_o, b_o, PROLOGUE)
        prod = (w & 15).to(tl.float32) * xe[None, :] + (w >> 4).to(tl.float32) * xo[None, :]   # [BN, BK/2]
        GT: tl.constexpr = BLOCK_K // GROUP
        per_group = tl.sum(tl.reshape(prod, [BLOCK_N, GT, GROUP // 2]), 2)                 # [BN, GT]
        x_sum = tl.sum(tl.reshape(xe + xo, [GT, GROUP // 2]), 1)                           # [GT]
        if SYM:
            part = tl.sum(s.to(tl.float32) * (per_group - 8.0 * x_sum[None, :]), 1)
        else:
            part = tl.sum(s.to(tl.float32) * per_group + z.to(tl.float32) * x_sum[None, :], 1)
        return part, sq_e + sq_o

    @triton.jit
    def _gemv_q4_kernel(q_ptr, s_ptr, z_ptr, x_ptr, out_ptr, nw_ptr, idx_ptr, N, eps,
                        K: tl.constexpr, K_PER: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                        PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, ROUND: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """_gemv_kernel over group-wise INT4 weights (bluelm_v/nn/packing.py: two codes a byte,
        fp16 scales [N, K/GROUP], zeros too unless SYM), unpacked in registers: same PROLOGUE
        and EPILOGUE. The first tile (codes and scales) is loaded before waiting on the previous
        kernel; each next tile is loaded while the current one is used. BLOCK_K % GROUP == 0."""
        if PDL:
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        k_lo = tl.program_id(1) * K_PER
        w, s, z = _q4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, k_lo, True, K, GROUP, SYM, BLOCK_K)
        if PDL:
            gdc_wait()
        y = tl.zeros([BLOCK_N], tl.float32)
        sq_acc = tl.zeros([BLOCK_K // 2], tl.float32)
        for k0 in range(0, K_PER, BLOCK_K):
            w_n, s_n, z_n = _q4_tile(q_ptr, s_ptr, z_ptr, rows, rmask, k_lo + k0 + BLOCK_K, k0 + BLOCK_K < K_PER,
                                     K, GROUP, SYM, BLOCK_K)
            part, sq = _q4_dot(w, s, z, x_ptr, nw_ptr, k_lo + k0, K, GROUP, SYM, PROLOGUE, BLOCK_N, BLOCK_K)
            y += part
            sq_acc += sq
            w, s, z = w_n, s_n, z_n
        if PROLOGUE == 1:
            y = y * tl.rsqrt(tl.sum(sq_acc, 0) / K + eps)
        _gemv_out(y, rows, rmask, out_ptr, idx_ptr, pid_n, EPILOGUE, ROUND)

    @triton.jit
    def _gemv_q8_kernel(q_ptr, s_ptr, x_ptr, out_ptr, nw_ptr, idx_ptr, N, eps,
                        K: tl.constexpr, K_PER: tl.constexpr, PROLOGUE: tl.constexpr,
                        EPILOGUE: tl.constexpr, ROUND: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """_gemv_kernel over per-row INT8 weights (int8 [N, K], fp32 scale [N]: the w4
        quantizer's lm_head and tied embedding), scale applied to the row sums."""
        if PDL:
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        k_lo = tl.program_id(1) * K_PER
        tile = tl.arange(0, BLOCK_K)
        w = _w_tile(q_ptr + rows[:, None] * K, k_lo + tile, rmask, True, K, False)
        if PDL:
            gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sq_acc = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K_PER, BLOCK_K):
            ks = k_lo + k0 + tile
            w_n = _w_tile(q_ptr + rows[:, None] * K, ks + BLOCK_K, rmask, k0 + BLOCK_K < K_PER, K, False)
            a, b = _x_load(x_ptr, nw_ptr, ks, ks < K, K, PROLOGUE)
            xv, sq = _x_apply(a, b, PROLOGUE)
            acc += w.to(tl.float32) * xv[None, :]
            sq_acc += sq
            w = w_n
        y = tl.sum(acc, 1) * tl.load(s_ptr + rows, mask=rmask, other=0.0)
        if PROLOGUE == 1:
            y = y * tl.rsqrt(tl.sum(sq_acc, 0) / K + eps)
        _gemv_out(y, rows, rmask, out_ptr, idx_ptr, pid_n, EPILOGUE, ROUND)

    @triton.jit
    def _embed_q_kernel(tok_ptr, q_ptr, s_ptr, z_ptr, x_ptr, D: tl.constexpr, BITS: tl.constexpr,
                        GROUP: tl.constexpr, SYM: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """x = the token's row of a quantised table, dequantised (BITS 8: per-row scale; 4: groups)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        tok = tl.load(tok_ptr)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        if BITS == 8:
            v = tl.load(q_ptr + tok * D + offs, mask=m, other=0).to(tl.float32) * tl.load(s_ptr + tok)
        else:
            byte = tl.load(q_ptr + tok * (D // 2) + offs // 2, mask=m, other=0)
            code = tl.where(offs % 2 == 0, byte & 15, byte >> 4).to(tl.float32)
            gs = tok * (D // GROUP) + offs // GROUP
            sc = tl.load(s_ptr + gs, mask=m, other=0.0).to(tl.float32)
            if SYM:
                v = sc * (code - 8.0)
            else:
                v = sc * code + tl.load(z_ptr + gs, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, v, mask=m)

    @triton.jit
    def _merge_partials(opart_ptr, ml_ptr, out_ptr, h, pos, HEAD_D: tl.constexpr, NSPLIT: tl.constexpr,
                        NS_P2: tl.constexpr, BLOCK: tl.constexpr):
        """Head h's split partials (o [NS,d], m, l) -> out[h*d:(h+1)*d]; read through L2 (.cg):
        other programs of the running kernel wrote them."""
        s_idx = tl.arange(0, NS_P2)
        ok = (s_idx < NSPLIT) & (s_idx * BLOCK <= pos)
        dims = tl.arange(0, HEAD_D)
        m = tl.load(ml_ptr + (h * NSPLIT + s_idx) * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(ml_ptr + (h * NSPLIT + s_idx) * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        o = tl.load(opart_ptr + (h * NSPLIT + s_idx)[:, None] * HEAD_D + dims[None, :], mask=ok[:, None],
                    other=0.0, cache_modifier=".cg")                                   # [NS_P2, d]
        wgt = tl.where(ok, tl.exp2(m - tl.max(m, 0)), 0.0)
        tl.store(out_ptr + h * HEAD_D + dims, tl.sum(wgt[:, None] * o, 0) / tl.sum(wgt * lsum, 0))

    @triton.jit
    def _attn_kernel(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, opart_ptr, ml_ptr, cnt_ptr, out_ptr,
                     qk_scale, S, H: tl.constexpr, KV: tl.constexpr, HEAD_D: tl.constexpr,
                     NSPLIT: tl.constexpr, NS_P2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                     MERGE: tl.constexpr):
        """Program (head h, split sp): softmax (base 2) over keys [sp*BLOCK, sp*BLOCK+BLOCK) <=
        pos in one shot -> unnormalised o, max m, sum l. The cached keys/values (rows < pos,
        written by earlier steps) are loaded before waiting on the qkv GEMV; then RoPE of q and
        of the new k, the new k/v written to row pos (sp 0, first head of its group) and used
        from registers. MERGE: the last program of head h to finish (a per-head counter, reset
        by it) merges the head's partials into out; else _merge_kernel does. The tiles stay in
        the cache dtype (registers: more programs resident); row pos enters as a separate term."""
        if PDL:
            gdc_launch_dependents()
        h = tl.program_id(0)
        sp = tl.program_id(1)
        G: tl.constexpr = H // KV
        kvh = h // G
        pos = tl.load(pos_ptr).to(tl.int32)            # advanced only by the previous step's last kernel
        start = sp * BLOCK
        if start <= pos:
            dims = tl.arange(0, HEAD_D)
            head_off = kvh * S * HEAD_D
            offs = start + tl.arange(0, BLOCK)
            ptrs = head_off + offs[:, None] * HEAD_D + dims[None, :]
            old = (offs < pos)[:, None]
            kt = tl.load(kc_ptr + ptrs, mask=old, other=0.0, eviction_policy="evict_first")   # [BLOCK,d]
            vt = tl.load(vc_ptr + ptrs, mask=old, other=0.0, eviction_policy="evict_first")
            if PDL:
                gdc_wait()
            rot = (dims + HEAD_D // 2) % HEAD_D
            c = tl.load(cos_ptr + pos * HEAD_D + dims).to(tl.float32)
            sn = tl.load(sin_ptr + pos * HEAD_D + dims).to(tl.float32)
            q = (tl.load(qkv_ptr + h * HEAD_D + dims, cache_modifier=".cg") * c
                 + tl.load(qkv_ptr + h * HEAD_D + rot, cache_modifier=".cg") * sn) * qk_scale
            ko = (H + kvh) * HEAD_D
            vo = (H + KV + kvh) * HEAD_D
            k_new = (tl.load(qkv_ptr + ko + dims, cache_modifier=".cg") * c
                     + tl.load(qkv_ptr + ko + rot, cache_modifier=".cg") * sn)
            k_new = k_new.to(kc_ptr.dtype.element_ty)
            v_new = tl.load(qkv_ptr + vo + dims, cache_modifier=".cg").to(vc_ptr.dtype.element_ty)
            if (sp == 0) & (h % G == 0):
                tl.store(kc_ptr + head_off + pos * HEAD_D + dims, k_new)
                tl.store(vc_ptr + head_off + pos * HEAD_D + dims, v_new)
            is_new = offs == pos                                                  # [BLOCK]; row pos: this step's
            sc = tl.sum(kt.to(tl.float32) * q[None, :], 1)                           # [BLOCK] (row pos: 0)
            sc = tl.where(is_new, tl.sum(k_new.to(tl.float32) * q, 0), sc)
            sc = tl.where(offs <= pos, sc, float("-inf"))
            m = tl.max(sc, 0)
            p = tl.exp2(sc - m)
            p_new = tl.sum(tl.where(is_new, p, 0.0), 0)                            # 0 unless pos is here
            o = tl.sum(p[:, None] * vt.to(tl.float32), 0) + p_new * v_new.to(tl.float32)   # [d]
            slot = h * NSPLIT + sp
            tl.store(opart_ptr + slot * HEAD_D + dims, o)
            tl.store(ml_ptr + slot * 2, m)
            tl.store(ml_ptr + slot * 2 + 1, tl.sum(p, 0))
            if MERGE:
                tl.debug_barrier()                     # every thread's partial stored before the count
                done = tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel", scope="gpu")
                if done == pos // BLOCK:               # the last of the head's pos//BLOCK + 1 programs
                    _merge_partials(opart_ptr, ml_ptr, out_ptr, h, pos, HEAD_D, NSPLIT, NS_P2, BLOCK)
                    tl.store(cnt_ptr + h, 0)

    @triton.jit
    def _batch_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, opart_ptr, ml_ptr, qk_scale, S,
                           H: tl.constexpr, KV: tl.constexpr, HEAD_D: tl.constexpr, NSPLIT: tl.constexpr,
                           BLOCK: tl.constexpr):
        """Batched decode attention, program (row, head h, split sp): q [rows, H, d] (RoPE done)
        over keys [sp*BLOCK, sp*BLOCK+BLOCK) <= pos[row] of cache slot ``row`` (k/v [slots, KV,
        S, d], this step's row already written) -> partials (o, m, l) as _attn_kernel makes them;
        splits past a row's position exit at once (a short row reads only its own keys)."""
        row = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        pos = tl.load(pos_ptr + row).to(tl.int32)
        start = sp * BLOCK
        if start <= pos:
            dims = tl.arange(0, HEAD_D)
            offs = start + tl.arange(0, BLOCK)
            seen = offs <= pos
            base = (row * KV + h // (H // KV)) * S * HEAD_D
            ptrs = base + offs[:, None] * HEAD_D + dims[None, :]
            kt = tl.load(k_ptr + ptrs, mask=seen[:, None], other=0.0, eviction_policy="evict_first")   # [BLOCK,d]
            vt = tl.load(v_ptr + ptrs, mask=seen[:, None], other=0.0, eviction_policy="evict_first")
            q = tl.load(q_ptr + (row * H + h) * HEAD_D + dims).to(tl.float32) * qk_scale
            sc = tl.where(seen, tl.sum(kt.to(tl.float32) * q[None, :], 1), float("-inf"))
            m = tl.max(sc, 0)
            p = tl.exp2(sc - m)
            slot = (row * H + h) * NSPLIT + sp
            tl.store(opart_ptr + slot * HEAD_D + dims, tl.sum(p[:, None] * vt.to(tl.float32), 0))
            tl.store(ml_ptr + slot * 2, m)
            tl.store(ml_ptr + slot * 2 + 1, tl.sum(p, 0))

    @triton.jit
    def _batch_merge_kernel(opart_ptr, ml_ptr, pos_ptr, out_ptr, H: tl.constexpr, HEAD_D: tl.constexpr,
                            NSPLIT: tl.constexpr, NS_P2: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row, h): merge the row's head-h partials -> out [rows, H, d]."""
        row = tl.program_id(0)
        _merge_partials(opart_ptr, ml_ptr, out_ptr, row * H + tl.program_id(1), tl.load(pos_ptr + row).to(tl.int32),
                        HEAD_D, NSPLIT, NS_P2, BLOCK)

    @triton.jit
    def _merge_kernel(opart_ptr, ml_ptr, pos_ptr, out_ptr, HEAD_D: tl.constexpr, NSPLIT: tl.constexpr,
                      NS_P2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program h: merge head h's split partials -> out[h*d:(h+1)*d] (fp32)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        h = tl.program_id(0)
        _merge_partials(opart_ptr, ml_ptr, out_ptr, h, tl.load(pos_ptr).to(tl.int32), HEAD_D, NSPLIT, NS_P2,
                        BLOCK)

    @triton.jit
    def _argmax_kernel(val_ptr, idx_ptr, n, tok_ptr, next_ptr, pos_ptr, hist_ptr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
        """The step's token (lowest index among the blocks' maxima) -> tok, next, hist[pos]; pos += 1."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        offs = tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(val_ptr + offs, mask=m, other=float("-inf"))
        i = tl.load(idx_ptr + offs, mask=m, other=2147483647)
        best = tl.min(tl.where(v == tl.max(v, 0), i, 2147483647), 0).to(tl.int64)
        pos = tl.load(pos_ptr)
        tl.store(tok_ptr, best)
        tl.store(next_ptr, best)
        tl.store(hist_ptr + pos, best)
        tl.store(pos_ptr, pos + 1)
else:  # pragma: no cover - the names exist without triton
    _embed_kernel = _gemv_kernel = _attn_kernel = _merge_kernel = _argmax_kernel = None
    _gemv_q4_kernel = _gemv_q8_kernel = _embed_q_kernel = _batch_attn_kernel = _batch_merge_kernel = None
