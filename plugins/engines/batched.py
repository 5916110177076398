"""Batched prefill and greedy decode over a FastLlamaEngine's weights (engines ``fast``, ``auto``
on Llama-family models, and ``triton``: its Triton kernels are batch-1, so batches decode
through this module's torch step).

    eng.begin_batch(rows=32, max_len=1856)                  # a BatchedKVCache of 32 slots
    logits = eng.prefill_batch([emb_0, ..., emb_31], 4096)  # [32, V] last logits of each row
    toks = eng.steps_batch([0, 1, 5], [t0, t1, t5], n=8)    # 8 greedy tokens for each listed row

Prefill packs rows into forwards of at most ``chunk`` tokens (whole rows while they fit; a row
longer than ``chunk`` in pieces): the projections and the MLP run once over every packed token
(one GEMM of sum-of-lengths rows), attention runs per row segment over that row's cache slot
(causal; a later piece of a long row also sees its earlier pieces, through a mask).
Decode: each listed row advances one position per step, with its own position (RoPE, mask over
its slot, cache write). A row no longer listed is finished: when the live rows fit a smaller
bucket (1, 2, 4, 8, ... slots) their slots are moved to the front and the step runs on that
bucket alone (finished rows stop costing work; live rows in a bucket's spare slots are not
possible, spare slots compute and are ignored). On CUDA each (bucket, attended length) is one
CUDA graph, captured at first use from a step that feeds itself (token, position and history
on the device), so ``n`` replays are queued and the tokens read once.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from bluelm_v.nn.kernels.triton_decode import triton
from bluelm_v.nn.kv_cache import BatchedKVCache

ALIGN = 64          # cache rows are allocated (and attended) in multiples of this
ATTN_BLOCK = 64     # keys per program of the Triton decode attention
ATTENTION = ("auto", "sdpa", "triton")


def bucket_size(n: int, slots: int) -> int:
    """Slots a decode step runs on for n live rows: the next power of two, at most ``slots``."""
    b = 1
    while b < n:
        b *= 2
    return min(b, slots)


def pack_rows(lengths: list[int], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Prefill forwards of at most ``chunk`` tokens -> [[(row, start, n), ...], ...]: rows in
    order, whole while they fit, a row longer than ``chunk`` cut into pieces (its last piece may
    share a forward with the rows after it)."""
    forwards, cur, used = [], [], 0
    for row, length in enumerate(lengths):
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            if used + n > chunk and cur:
                forwards.append(cur)
                cur, used = [], 0
            cur.append((row, start, n))
            used += n
    if cur:
        forwards.append(cur)
    return forwards


def segment_attention(q, k, v, start: int, scale: float):
    """q [1,H,n,d] at positions start..start+n-1 over k/v [1,KV,start+n,d], causal -> [1,H,n,d]."""
    g = q.shape[1] // k.shape[1]
    if g > 1:                                  # GQA: keys/values shared by g query heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    n = q.shape[2]
    cols = torch.arange(start + n, device=q.device)
    mask = cols[None] <= (start + torch.arange(n, device=q.device))[:, None]     # [n, start+n]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention(q, k, v, visible, scale: float):
    """q [b,KV,g,d] (one position per row) over k/v [b,KV,S,d]; visible [b,1,1,S] bool ->
    [b,KV,g,d]. CUDA: scaled_dot_product_attention; CPU: two matmuls (cheaper there)."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                        # [b,KV,g,S]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(scores.float().softmax(-1).to(v.dtype), v)


def triton_attention_usable(eng) -> bool:
    """The Triton decode attention can run: triton on CUDA (or its interpreter), and a
    power-of-two head dim."""
    return triton is not None and eng.head_dim & (eng.head_dim - 1) == 0 and \
        (eng.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


class BatchedLlama:
    """Batched sequences over one FastLlamaEngine (``eng``): see the module docstring.
    ``attention`` (decode): ``triton`` (split-KV kernels: each row reads only its own keys),
    ``sdpa`` (scaled_dot_product_attention over the batch's whole window, masked) or ``auto``
    (triton on CUDA where it can run, else sdpa)."""

    def __init__(self, eng, attention: str = "auto"):
        if attention not in ATTENTION:
            raise ValueError(f"batch attention {attention!r}: use one of {list(ATTENTION)}")
        self.eng = eng
        self.cache: BatchedKVCache | None = None
        self._graphs: dict[tuple[int, int], object] = {}
        self._pool = None
        self.use_graph = eng.use_graph
        usable = triton_attention_usable(eng)
        if attention == "triton" and not usable:
            raise ValueError("batch attention triton: needs triton on CUDA (or TRITON_INTERPRET=1) "
                             "and a power-of-two head dim")
        self.triton_attn = attention == "triton" or (attention == "auto" and usable and eng.device.type == "cuda")

    # -- cache and rows -------------------------------------------------------------------
    def begin(self, rows: int, max_len: int) -> None:
        """Start ``rows`` sequences of at most ``max_len`` positions each; the cache is
        reallocated only when it has too few slots or positions."""
        eng, n_pos = self.eng, self.eng.cos.shape[0]
        if max_len > n_pos:
            raise ValueError(f"max_len {max_len} exceeds the model's {n_pos} positions")
        kv_len = min(-(-max_len // ALIGN) * ALIGN, n_pos)
        c = self.cache
        if c is None or c.slots < rows or c.max_len < kv_len:
            # The graphs captured for the old cache go, and their memory pool with them: a pool
            # whose graphs are all destroyed is freed, and capturing into its stale handle again
            # trips the CUDA caching allocator (`use_count > 0` assert) on the next release.
            self.cache, self._graphs, self._pool = None, {}, None
            self.cache = BatchedKVCache.allocate(len(eng.layers), rows, eng.n_kv, eng.head_dim, kv_len,
                                                 eng.dtype, eng.device)
            long = dict(dtype=torch.long, device=eng.device)
            self._tok, self._pos = torch.zeros(rows, **long), torch.zeros(rows, **long)
            self._hist = torch.zeros(rows, kv_len, **long)          # token made at (slot, position)
            self._slot_ids, self._kv_ids = torch.arange(rows, **long), torch.arange(eng.n_kv, **long)
            self._arange = torch.arange(kv_len, **long)
            if self.triton_attn:           # split partials (o, m, l) of every row, head and key block
                f32 = dict(dtype=torch.float32, device=eng.device)
                n_split = -(-kv_len // ATTN_BLOCK)
                self._opart = torch.zeros(rows, eng.n_heads, n_split, eng.head_dim, **f32)
                self._ml = torch.zeros(rows, eng.n_heads, n_split, 2, **f32)
                self._attn_out = torch.zeros(rows, eng.n_heads, eng.head_dim, dtype=eng.dtype, device=eng.device)
        self.kv_len, self.rows = kv_len, rows
        self.lengths = [0] * rows                                   # positions filled, per row
        self.slot_of = list(range(rows))                            # row -> cache slot
        self.bucket = bucket_size(rows, self.cache.slots)

    @property
    def capacity(self) -> int:
        """Positions each row may fill."""
        return self.kv_len

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def _compact(self, rows: list[int]) -> None:
        """Move the slots of ``rows`` (the live ones) to the front, in slot order."""
        order = sorted(rows, key=lambda r: self.slot_of[r])
        for dst, r in enumerate(order):        # dst <= its source, sources increase: no clobbering
            self.cache.move(self.slot_of[r], dst, self.lengths[r])
            self.slot_of[r] = dst
        self.bucket = bucket_size(len(rows), self.cache.slots)

    # -- one layer, both shapes -----------------------------------------------------------
    def _qkv(self, i: int, h):
        """h [B,T,D] -> (q|k [B,T,H+KV,d] before RoPE, v [B,T,KV,d])."""
        eng, attn = self.eng, self.eng.layers[i].self_attn
        b, t, d, hk = h.shape[0], h.shape[1], eng.head_dim, eng.n_heads + eng.n_kv
        if eng.qkv[i] is not None:
            qkv = F.linear(h, *eng.qkv[i])                                  # [B,T,(H+2KV)d]
            return (qkv[..., : eng.q_dim + eng.kv_dim].view(b, t, hk, d),
                    qkv[..., eng.q_dim + eng.kv_dim:].view(b, t, eng.n_kv, d))
        return (torch.cat([attn.q_proj(h), attn.k_proj(h)], -1).view(b, t, hk, d),
                attn.v_proj(h).view(b, t, eng.n_kv, d))

    def _finish_layer(self, i: int, o, x):
        """Attention output o [B,T,H*d] -> o projection + residual, then the MLP block."""
        eng, layer = self.eng, self.eng.layers[i]
        x = eng._proj_residual(layer.self_attn.o_proj, o, x)
        h = eng._norm(layer.post_attention_layernorm, x)
        if eng.gate_up[i] is not None:
            gate, up = F.linear(h, *eng.gate_up[i]).chunk(2, -1)
            return eng._proj_residual(layer.mlp.down_proj, layer.mlp.act_fn(gate) * up, x)
        return x + layer.mlp(h)

    def _rope(self, qk, positions):
        """RoPE of q and k at ``positions`` (shape of qk's leading dims) in one pass."""
        eng, d = self.eng, self.eng.head_dim
        flat = positions.reshape(-1)
        cos = eng.cos.index_select(0, flat).view(*positions.shape, 1, d)     # [..., 1, d]
        sin_s = eng.sin_signed.index_select(0, flat).view(*positions.shape, 1, d)
        return torch.addcmul(qk * cos, torch.roll(qk, d // 2, -1), sin_s)

    # -- prefill --------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, embeds: list, chunk: int) -> torch.Tensor:
        """embeds[r] [1, L_r, D] -> [rows, V] fp32 logits of each row's last position."""
        eng = self.eng
        if len(embeds) != self.rows:
            raise ValueError(f"{len(embeds)} prompts for a batch of {self.rows} rows")
        lengths = [int(e.shape[1]) for e in embeds]
        if max(lengths) > self.kv_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens exceeds the batch's {self.kv_len} positions")
        last: list = [None] * self.rows
        for segments in pack_rows(lengths, chunk):
            x = torch.cat([embeds[r][0, s:s + n] for r, s, n in segments])[None].to(eng.dtype)   # [1,T,D]
            positions = torch.cat([torch.arange(s, s + n) for _, s, n in segments]).to(eng.device)   # [T]
            for i in range(len(eng.layers)):
                x = self._prefill_layer(i, x, positions, segments)
            ends, rows, off = [], [], 0
            for r, s, n in segments:
                off += n
                if s + n == lengths[r]:
                    ends.append(off - 1)
                    rows.append(r)
            if ends:
                h = eng._norm(eng.base.norm, x[0, ends])                     # [k, D]
                for r, lg in zip(rows, eng.model.lm_head(h).float()):
                    last[r] = lg
        self.lengths = lengths
        return torch.stack(last)                                             # [rows, V]

    def _prefill_layer(self, i: int, x, positions, segments):
        """Layer i over packed rows: x [1,T,D] at ``positions`` [T] -> [1,T,D]."""
        eng, layer = self.eng, self.eng.layers[i]
        hq, d = eng.n_heads, eng.head_dim
        qk, v = self._qkv(i, eng._norm(layer.input_layernorm, x))
        qk = self._rope(qk, positions[None])                                 # [1,T,H+KV,d]
        outs, off = [], 0
        for r, s, n in segments:
            kc, vc = self.cache.k[i, self.slot_of[r]], self.cache.v[i, self.slot_of[r]]   # [KV,S,d]
            kc[:, s:s + n] = qk[0, off:off + n, hq:].transpose(0, 1)
            vc[:, s:s + n] = v[0, off:off + n].transpose(0, 1)
            q = qk[0, off:off + n, :hq].transpose(0, 1)[None]                 # [1,H,n,d]
            o = segment_attention(q, kc[None, :, :s + n], vc[None, :, :s + n], s, eng.scaling)
            outs.append(o[0].transpose(0, 1).reshape(n, hq * d))
            off += n
        return self._finish_layer(i, torch.cat(outs)[None], x)

    # -- decode ---------------------------------------------------------------------------
    def _step(self, b: int, kv_len: int) -> None:
        """One greedy step of slots [0, b) at their positions; token -> next token, history,
        position += 1 (held at the last attended row: spare slots never index past it)."""
        eng = self.eng
        tok, pos = self._tok[:b], self._pos[:b]                              # [b]
        x = eng.base.embed_tokens(tok)[:, None]                              # [b,1,D]
        visible = (self._arange[:kv_len][None] <= pos[:, None])[:, None, None]   # [b,1,1,S]
        slots = self._slot_ids[:b, None]
        hq, kv, d = eng.n_heads, eng.n_kv, eng.head_dim
        for i, layer in enumerate(eng.layers):
            qk, v = self._qkv(i, eng._norm(layer.input_layernorm, x))        # [b,1,H+KV,d]
            qk = self._rope(qk, pos[:, None])
            kc, vc = self.cache.k[i], self.cache.v[i]                         # [slots,KV,S,d]
            kc[slots, self._kv_ids[None], pos[:, None]] = qk[:, 0, hq:]       # [b,KV,d]
            vc[slots, self._kv_ids[None], pos[:, None]] = v[:, 0]
            if self.triton_attn:
                o = self._triton_attention(qk[:, 0, :hq].contiguous(), kc, vc, pos, b, kv_len)   # [b,H,d]
            else:
                q = qk[:, 0, :hq].reshape(b, kv, hq // kv, d)                 # [b,KV,g,d]
                o = decode_attention(q, kc[:b, :, :kv_len], vc[:b, :, :kv_len], visible, eng.scaling)
            x = self._finish_layer(i, o.reshape(b, 1, hq * d), x)
        nxt = eng.model.lm_head(eng._norm(eng.base.norm, x))[:, -1].argmax(-1)   # [b]
        tok.copy_(nxt)
        self._hist[self._slot_ids[:b], pos] = nxt
        pos.copy_((pos + 1).clamp_(max=kv_len - 1))

    def _triton_attention(self, q, kc, vc, pos, b: int, kv_len: int):
        """q [b,H,d] over slots [0, b) of kc/vc [slots,KV,S,d], keys [0, pos[row]] -> [b,H,d]
        (bluelm_v/nn/kernels/triton_decode.py: _batch_attn_kernel, _batch_merge_kernel)."""
        from bluelm_v.nn.kernels.triton_decode import _batch_attn_kernel, _batch_merge_kernel

        eng, n_split = self.eng, -(-kv_len // ATTN_BLOCK)
        consts = dict(H=eng.n_heads, HEAD_D=eng.head_dim, NSPLIT=n_split, BLOCK=ATTN_BLOCK)
        _batch_attn_kernel[(b, eng.n_heads, n_split)](q, kc, vc, pos, self._opart, self._ml,
                                                     eng.scaling * math.log2(math.e), kc.shape[2],
                                                     KV=eng.n_kv, **consts)
        _batch_merge_kernel[(b, eng.n_heads)](self._opart, self._ml, pos, self._attn_out,
                                              NS_P2=triton.next_power_of_2(n_split), **consts)
        return self._attn_out[:b]

    def _graph_for(self, b: int):
        """The CUDA graph of the step on b slots (captured now if new). Its warm-up steps run
        from the positions already set: they write only rows at or past each slot's length,
        which a later step rewrites before any attends to them; token and position are put back."""
        key = (b, self.kv_len)
        graph = self._graphs.get(key)
        if graph is None:
            saved = (self._tok.clone(), self._pos.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._step(b, self.kv_len)
            torch.cuda.current_stream().wait_stream(side)
            self._tok.copy_(saved[0])
            self._pos.copy_(saved[1])
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._step(b, self.kv_len)
            self._graphs[key] = graph
        return graph

    @torch.no_grad()
    def steps(self, rows: list[int], tokens: list[int], n: int) -> list[list[int]]:
        """n greedy tokens for each of ``rows`` (fed ``tokens``) -> one list per row. Rows left
        out are finished for good: their slots are given up."""
        if not rows or n < 1:
            return [[] for _ in rows]
        if any(self.lengths[r] + n > self.kv_len for r in rows):
            raise ValueError(f"batch cache of {self.kv_len} positions is full")
        if bucket_size(len(rows), self.cache.slots) < self.bucket:
            self._compact(rows)
        b, slots = self.bucket, [self.slot_of[r] for r in rows]
        tok, pos = [0] * b, [0] * b            # spare slots: token 0 at position 0
        for s, r, t in zip(slots, rows, tokens):
            tok[s], pos[s] = int(t), self.lengths[r]
        self._tok[:b].copy_(torch.tensor(tok))
        self._pos[:b].copy_(torch.tensor(pos))
        graph = self._graph_for(b) if self.use_graph else None
        for _ in range(n):
            if graph is not None:
                graph.replay()
            else:
                self._step(b, self.kv_len)
        where = torch.tensor([self.lengths[r] for r in rows])[:, None] + torch.arange(n)   # [rows, n]
        out = self._hist[torch.tensor(slots)[:, None].to(self._hist.device), where.to(self._hist.device)]
        for r in rows:
            self.lengths[r] += n
        return out.tolist()
