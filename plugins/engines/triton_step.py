"""Triton decode path for CUDA: a whole batch-1 greedy decode step in 5-6 kernels per layer.

    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine
    eng = TritonDecodeEngine(hf_model)          # a FastLlamaEngine: same begin/prefill/step API
    eng.begin(max_len); logits = eng.prefill(embeds, 128); tok = eng.step(int(logits.argmax()))
    toks = eng.steps(tok, 8)                    # 8 graph replays queued, tokens read once

Prefill is FastLlamaEngine's (cuBLAS/SDPA); only the decode step (``_static_step``, replayed as
one CUDA graph) is replaced. Per layer (x_res: the fp32 residual stream, on the device):
  1. qkv GEMV, RMSNorm fused into it (x*w_norm streamed, sum of squares on the side, 1/rms
     applied to the dot products at the end)                               -> qkv [fp32]
  2. split-KV attention (grid heads x key blocks): the block's cached keys/values loaded
     before waiting on step 1, RoPE of q and of the new k, the new k/v written to the cache row
     ``pos`` (read from a device scalar: graph-safe), one-shot softmax over the block's valid
     keys; blocks past pos exit at once -> partials (o, m, l), merged per head either by the
     last program of the head (a per-head atomic counter) or by a merge kernel -> attn [fp32]
  3. o GEMV, split-K, atomically added to x_res (the residual add)
  4. gate|up GEMV, post-attention RMSNorm fused                             -> gu [fp32]
  5. down GEMV, SiLU(gate)*up fused into its prologue; split-K, atomically added to x_res
then the final norm + lm_head GEMV with a per-block argmax (logits rounded to the model dtype,
lowest index on ties, as torch.argmax on the reference's logits) and one kernel that picks the
token, writes it to the token buffer and the history (``_hist[pos]``) and advances the position.
On Hopper every kernel is launched with programmatic dependent launch (``pdl``): it starts while
the previous one drains and reads its first ``pre`` weight tiles before waiting; GEMVs then keep
``depth`` weight tiles and the next input tile in flight (``prefetch``). Block shapes, ``pre``
and ``depth`` are chosen at ``prepare()``: candidates timed per call site over all layers, each
in a CUDA graph, then the best few of each site (the attention merge among them) timed as the
whole step (``configs=`` fixes them; ``eng.tuning`` / ``eng.step_tuning`` hold what was measured).
Without CUDA the kernels run under TRITON_INTERPRET=1 (slow; tests).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

from bluelm_v.plugins.engines.fast import FastLlamaEngine
from bluelm_v.plugins.engines.triton_quant import QWeight, embed_quant, gemv_quant, step_weights
from bluelm_v.nn.kv_cache import KVCache

from bluelm_v.nn.kernels.triton_decode import triton  # None without triton
from bluelm_v.nn.kernels.triton_decode import (  # noqa: F401
    _embed_kernel,
    _gemv_kernel,
    _attn_kernel,
    _merge_kernel,
    _argmax_kernel)


def triton_usable(device: torch.device) -> bool:
    """Triton present and either a CUDA device or the CPU interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    pre: int = 1           # block_k tiles loaded before waiting on the previous kernel
    depth: int = 1         # tiles in flight ahead of the one in use (0-2)

    def k_per_split(self, k: int) -> int:
        """Columns per K-split, a multiple of block_k."""
        return -(-(-(-k // self.split_k)) // self.block_k) * self.block_k

    def head_k(self, k: int) -> int:
        """Columns loaded before the wait: pre tiles, at most the split (a power of two)."""
        per, head = self.k_per_split(k), self.block_k
        while head * 2 <= min(per, self.pre * self.block_k):
            head *= 2
        return head


@dataclass(frozen=True)
class AttnConfig:
    block: int             # keys per program: program (h, j) attends keys [j*block, (j+1)*block)
    num_warps: int = 4
    fused_merge: bool = True   # the last program of a head merges (else a second kernel)

    def n_split(self, max_len: int) -> int:
        return -(-max_len // self.block)


WIDE_TILES = ((2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (16, 256, 4),
              (16, 512, 8), (32, 128, 4))                   # (block_n, block_k, num_warps)
SPLIT_TILES = ((4, 256, 4), (8, 128, 4), (8, 256, 4), (16, 128, 4), (16, 256, 8))


def gemv_candidates(n: int, k: int, split_k: tuple[int, ...] = (1,), tiles=WIDE_TILES) -> list[GemvConfig]:
    """Block shapes worth timing for an [n, k] weight (split-K only where the caller can add)."""
    out = []
    for s in split_k:
        for bn, bk, nw in tiles:
            per = -(-k // s)
            if s > 1 and per % bk:
                continue        # split-K only where every split is whole block_k pieces
            out.append(GemvConfig(bn, bk, s, nw))
    return out


SLOTS = ("qkv", "attn", "o", "gu", "down")      # a layer's call sites in order
STEP_CANDIDATES, STEP_REPLAYS = 3, 7            # per site, re-timed on the whole step (_refine_on_step)
DEFAULTS = {"qkv": GemvConfig(8, 256), "gu": GemvConfig(4, 512), "o": GemvConfig(8, 128, 3),
            "down": GemvConfig(8, 128, 5), "lm": GemvConfig(8, 256), "attn": AttnConfig(64)}


def split_attention_reference(q, k, v, n_split: int, scaling: float):
    """Pure-torch mirror of the kernels' split-KV attention + merge (for tests): q [H,d],
    k/v [H,L,d] -> [H,d], each split a separate softmax (base 2), merged by max/rescale."""
    chunks_k, chunks_v = k.split(-(-k.shape[1] // n_split), 1), v.split(-(-k.shape[1] // n_split), 1)
    ms, ls, os_ = [], [], []
    for kc, vc in zip(chunks_k, chunks_v):
        s = torch.einsum("hd,hld->hl", q.float() * scaling * math.log2(math.e), kc.float())  # [H,l]
        m = s.max(-1).values                                                                 # [H]
        p = torch.exp2(s - m[:, None])
        ms.append(m), ls.append(p.sum(-1)), os_.append(torch.einsum("hl,hld->hd", p, vc.float()))
    m, l, o = torch.stack(ms), torch.stack(ls), torch.stack(os_)          # [S,H], [S,H], [S,H,d]
    w = torch.exp2(m - m.max(0).values)                                   # [S,H]
    return (w[..., None] * o).sum(0) / (w * l).sum(0)[:, None]


class TritonDecodeEngine(FastLlamaEngine):
    """FastLlamaEngine whose decode step runs the Triton kernels above (see the module doc).
    Falls back to the parent's step where the model is not plain (quantised projections,
    an INT8 KV cache) or Triton cannot run."""

    name = "triton"

    def __init__(self, hf_model, configs: dict | None = None, tune: bool = True,
                 debug_logits: bool = False, tune_budget_s: float = 150.0, pdl: bool = True,
                 prefetch: bool = True, **kw):
        kw.setdefault("static_step", True)
        super().__init__(hf_model, **kw)
        lm, emb, norm = hf_model.lm_head, self.base.embed_tokens, self.base.norm
        self.step_w = step_weights(self)       # per layer: float weights or INT4/INT8 QWeights
        self.lm_w = lm.weight if type(lm) is torch.nn.Linear and lm.bias is None else QWeight.of(lm)
        self.emb_w = emb.weight if type(emb) is torch.nn.Embedding else QWeight.of(emb)
        self.vocab = lm.weight.shape[0] if type(lm) is torch.nn.Linear else getattr(lm, "out_features", 0)
        self.triton_ok = (triton_usable(self.device) and self.step_w is not None
                          and self.lm_w is not None and self.emb_w is not None
                          and getattr(norm, "weight", None) is not None
                          and self.dtype in (torch.bfloat16, torch.float16, torch.float32)
                          and self.head_dim & (self.head_dim - 1) == 0)      # tl.arange(0, HEAD_D)
        self.configs = dict(DEFAULTS)
        self.configs.update(configs or {})
        self.fixed = set(configs or {})
        self.tune = tune and self.device.type == "cuda"
        self.tune_budget_s = tune_budget_s
        self.pdl = pdl and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9
        self.prefetch = prefetch
        self.tuning: dict[str, list[tuple[object, float]]] = {}
        self.step_tuning: list[tuple[str, object, float]] = []    # whole-step seconds (_refine_on_step)
        self.debug_logits = debug_logits
        self._bufs_key = None
        self._tuned = False

    # -- buffers --------------------------------------------------------------------------
    def _ensure_buffers(self) -> None:
        s, attn = self.cache.max_len, self.configs["attn"]
        key = (s, attn)
        if self._bufs_key == key:
            return
        f32, dev = dict(dtype=torch.float32, device=self.device), self.device
        cfg = self.model.config
        d, big = self.head_dim, cfg.hidden_size
        self._x = torch.zeros(big, **f32)                                           # residual
        self._qkv = torch.zeros((self.n_heads + 2 * self.n_kv) * d, **f32)
        self._attn_out = torch.zeros(self.n_heads * d, **f32)
        self._gu = torch.zeros(2 * cfg.intermediate_size, **f32)
        ns = attn.n_split(s)
        self._opart = torch.zeros(self.n_heads, ns, d, **f32)                       # [H,NS,d]
        self._ml = torch.zeros(self.n_heads, ns, 2, **f32)                          # (m, l)
        self._attn_count = torch.zeros(self.n_heads, dtype=torch.int32, device=dev)  # 0 between kernels
        vocab = self.vocab
        self._part_val = torch.zeros(vocab, **f32)           # per-block maxima: enough for any block_n
        self._part_idx = torch.zeros(vocab, dtype=torch.int32, device=dev)
        self._next = torch.zeros(1, dtype=torch.long, device=dev)
        self._logits_buf = torch.zeros(vocab, **f32)
        self._bufs_key = key

    # -- launches -------------------------------------------------------------------------
    def _launch_opts(self, num_warps: int) -> dict:
        opts = dict(num_warps=num_warps, PDL=self.pdl)
        if self.pdl:
            opts["launch_pdl"] = True
        return opts

    def _gemv(self, cfg: GemvConfig, w, x, out, prologue: int, epilogue: int, nw=None, eps=0.0):
        if isinstance(w, QWeight):
            return gemv_quant(self, cfg, w, x, out, prologue, epilogue, nw, eps)
        n, k = w.shape
        if prologue == 1 and cfg.split_k != 1:
            raise ValueError("the fused RMSNorm needs split_k == 1")
        k_per, head_k = cfg.k_per_split(k), cfg.head_k(k)
        even = n % cfg.block_n == 0 and k_per * cfg.split_k == k and epilogue != 2
        _gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
            w, x, out, nw if nw is not None else w, self._part_idx, n, eps, K=k, K_PER=k_per,
            PROLOGUE=prologue, EPILOGUE=epilogue, EVEN=even,
            ROUND={torch.bfloat16: 1, torch.float16: 2}.get(self.dtype, 0), BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, PREFETCH=min(cfg.depth if self.prefetch else 0, (k_per - head_k) // cfg.block_k),
            HEAD_K=head_k,
            num_stages=cfg.num_stages, **self._launch_opts(cfg.num_warps))

    def _attn(self, cfg: AttnConfig, i: int, pos):
        """Attention partials of layer i (writing its new k/v), then their merge -> _attn_out."""
        kc, vc = self.cache.k[i], self.cache.v[i]                                   # [KV,S,d]
        ns = cfg.n_split(kc.shape[1])
        _attn_kernel[(self.n_heads, ns)](
            self._qkv, kc, vc, self.cos, self.sin_signed, pos, self._opart, self._ml, self._attn_count,
            self._attn_out, self.scaling * math.log2(math.e), kc.shape[1], H=self.n_heads, KV=self.n_kv,
            HEAD_D=self.head_dim, NSPLIT=ns, NS_P2=triton.next_power_of_2(ns), BLOCK=cfg.block,
            MERGE=cfg.fused_merge, **self._launch_opts(cfg.num_warps))
        if not cfg.fused_merge:
            _merge_kernel[(self.n_heads,)](self._opart, self._ml, pos, self._attn_out, HEAD_D=self.head_dim,
                                           NSPLIT=ns, NS_P2=triton.next_power_of_2(ns), BLOCK=cfg.block,
                                           **self._launch_opts(4))

    def _site(self, site: str, i: int, cfg=None, pos=None):
        """Launch call site ``site`` of layer i (i == -1: the lm head) with config cfg."""
        cfg = cfg or self.configs[site]
        if site == "attn":
            return self._attn(cfg, i, pos if pos is not None else self._pos)
        if site == "lm":
            norm = self.base.norm
            return self._gemv(cfg, self.lm_w, self._x, self._part_val, 1, 2,
                              norm.weight, float(getattr(norm, "variance_epsilon", 1e-6)))
        (w_in, w_qkv, w_o, w_post, w_gu, w_down), eps = self.step_w[i]
        if site == "qkv":
            return self._gemv(cfg, w_qkv, self._x, self._qkv, 1, 0, w_in, eps)
        if site == "o":
            return self._gemv(cfg, w_o, self._attn_out, self._x, 0, 1)
        if site == "gu":
            return self._gemv(cfg, w_gu, self._x, self._gu, 1, 0, w_post, eps)
        return self._gemv(cfg, w_down, self._gu, self._x, 2, 1)

    def _static_step(self):
        if not self.triton_ok or type(self.cache) is not KVCache:
            return super()._static_step()
        self._ensure_buffers()
        big = self._x.shape[0]
        if isinstance(self.emb_w, QWeight):
            embed_quant(self, self.emb_w)
        else:
            _embed_kernel[(1,)](self._tok, self.emb_w, self._x, D=big,
                                BLOCK=triton.next_power_of_2(big), PDL=self.pdl)   # no early start: first
        for i in range(len(self.layers)):
            for site in SLOTS:
                self._site(site, i)
        self._site("lm", -1)
        if self.debug_logits:
            norm = self.base.norm
            self._gemv(GemvConfig(16, 256), self.lm_w, self._x, self._logits_buf, 1, 0,
                       norm.weight, float(getattr(norm, "variance_epsilon", 1e-6)))
        n_part = triton.cdiv(self.vocab, self.configs["lm"].block_n)
        _argmax_kernel[(1,)](self._part_val, self._part_idx, n_part, self._tok, self._next, self._pos,
                             self._hist, BLOCK=triton.next_power_of_2(n_part), **self._launch_opts(4))
        return self._next

    @property
    def last_step_logits(self) -> torch.Tensor:
        """[V] fp32 logits of the last step (only with debug_logits=True)."""
        return self._logits_buf

    # -- tuning ---------------------------------------------------------------------------
    def _time_site(self, site: str, cfg, pos) -> float:
        """Seconds for ``site`` over all layers (one CUDA graph), median of 5 replays."""
        layers = [-1] if site == "lm" else range(len(self.layers))

        def run():
            for i in layers:
                self._site(site, i, cfg, pos)
        return self._time_graph(run)

    def _time_graph(self, run, reset=None, replays: int = 5) -> float:
        """Seconds for run() replayed as one CUDA graph, median of ``replays`` (reset() untimed
        before each)."""
        if reset:
            reset()
        run()                                         # compile + warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        times = []
        for _ in range(replays):
            if reset:
                reset()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        del graph
        return sorted(times)[len(times) // 2]

    def autotune(self) -> dict[str, list[tuple[object, float]]]:
        """Time the candidates of every call site (cache rows near the end attended, as at the
        end of a long prompt) and keep the fastest; returns {site: [(config, seconds)]}."""
        self._ensure_buffers()
        pos = torch.full((1,), self.cache.max_len - 2, dtype=torch.long, device=self.device)
        torch.nn.init.normal_(self._x)
        torch.nn.init.normal_(self._qkv)
        torch.nn.init.normal_(self._gu)
        saved = (self.cache.k[:, :, -2].clone(), self.cache.v[:, :, -2].clone())   # rows written
        cfg = self.model.config
        d, big, inter = self.head_dim, cfg.hidden_size, cfg.intermediate_size
        qkv_n = (self.n_heads + 2 * self.n_kv) * d
        candidates = {
            "attn": [AttnConfig(b, nw, fused) for fused in (True, False)
                     for b, nw in ((32, 1), (32, 2), (64, 1), (64, 2), (64, 4), (128, 2), (128, 4))],
            "qkv": gemv_candidates(qkv_n, big), "gu": gemv_candidates(2 * inter, big),
            "o": gemv_candidates(big, self.n_heads * d, (1, 2, 3, 6), SPLIT_TILES),
            "down": gemv_candidates(big, inter, (1, 3, 5), SPLIT_TILES),
            "lm": [c for c in gemv_candidates(self.vocab, big) if c.block_n >= 8],
        }
        site_w = {"qkv": self.step_w[0][0][1], "o": self.step_w[0][0][2], "gu": self.step_w[0][0][4],
                  "down": self.step_w[0][0][5], "lm": self.lm_w}
        for site, w in site_w.items():       # INT4: tiles of whole groups
            if isinstance(w, QWeight):
                candidates[site] = [c for c in candidates[site] if w.fits(c.block_k)]
        k_of = {"qkv": big, "gu": big, "o": self.n_heads * d, "down": inter, "lm": big}
        state = [t.clone() for t in (self._tok, self._pos, self._hist)]
        debug, self.debug_logits = self.debug_logits, False      # time the step decoding runs
        try:
            self._search_sites(candidates, k_of, pos)
            self._refine_on_step(pos)               # whole steps: they move the token and position
        finally:
            self.debug_logits = debug
            self._tok.copy_(state[0]), self._pos.copy_(state[1]), self._hist.copy_(state[2])
            self.cache.k[:, :, -2], self.cache.v[:, :, -2] = saved
        return self.tuning

    def _search_sites(self, candidates: dict, k_of: dict, pos) -> None:
        """Per call site, its candidates timed over all layers (within tune_budget_s), then more
        tiles before the wait for the best 2 shapes -> configs (the fastest), tuning."""
        deadline = time.perf_counter() + self.tune_budget_s
        for site, cands in candidates.items():
            if site in self.fixed:
                continue
            results, before = [], self.configs[site]

            def measure(c):
                try:
                    if site == "attn":
                        self.configs["attn"] = c
                        self._ensure_buffers()
                        torch.nn.init.normal_(self._qkv)
                    results.append((c, self._time_site(site, c, pos)))
                except Exception as exc:  # noqa: BLE001 -- a config that fails to build is skipped
                    results.append((c, float("inf")))
                    print(f"[cuda_decode] {site} {c}: {type(exc).__name__}: {str(exc)[:200]}")
            for c in cands:
                if results and time.perf_counter() > deadline:
                    break                           # out of tuning time: the best so far
                measure(c)
            if site != "attn" and not self._quantised(site):   # the best 2 shapes, more before the wait
                for c in [c for c, _ in sorted(results, key=lambda r: r[1])[:2]]:
                    for pre, depth in ((1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1)):
                        deeper = dataclasses.replace(c, pre=pre, depth=depth)
                        if deeper.head_k(k_of[site]) == pre * c.block_k and deeper != c \
                                and time.perf_counter() < deadline:
                            measure(deeper)
            best, sec = min(results, key=lambda r: r[1])
            if sec == float("inf"):
                best = before
                print(f"[cuda_decode] {site}: no candidate ran; keeping {before}")
            self.configs[site] = best
            if site == "attn":
                self._ensure_buffers()
                torch.nn.init.normal_(self._attn_out)
            self.tuning[site] = results

    def _quantised(self, site: str) -> bool:
        """A GEMV site whose weights are QWeights (their kernel has no head/depth settings)."""
        w = self.lm_w if site == "lm" else self.step_w[0][0][{"qkv": 1, "o": 2, "gu": 4, "down": 5}[site]]
        return isinstance(w, QWeight)

    def _refine_on_step(self, pos) -> None:
        """Per-site timings mislead: in the step a kernel overlaps its neighbours (early start,
        shared SMs) and the merge's cost moves between attention and a kernel boundary. So the
        best few candidates of each site (attention: two of each merge) are timed as the whole
        decode step (cache row pos rewritten each replay), one site at a time with the others
        at their best so far, and the fastest step's kept -> step_tuning [(site, config, s)].
        About 20 whole steps: not counted in tune_budget_s (the per-site search)."""
        def reset():
            self._pos.copy_(pos)
            self._tok.zero_()

        def step_time(site, c) -> float:
            try:
                return self._time_graph(self._static_step, reset, replays=STEP_REPLAYS)
            except Exception as exc:  # noqa: BLE001 -- as in the per-site search: skipped
                print(f"[cuda_decode] whole step with {site} {c}: {type(exc).__name__}: {str(exc)[:200]}")
                return float("inf")
        self.step_tuning = []
        for site, results in self.tuning.items():           # fixed sites were never tuned
            ranked = [c for c, t in sorted(results, key=lambda r: r[1]) if t < float("inf")]
            if site == "attn":
                ranked = [c for m in (True, False) for c in [c for c in ranked if c.fused_merge == m][:2]]
            else:
                ranked = ranked[:STEP_CANDIDATES]
            timed, before = [], self.configs[site]
            for c in ranked:
                self.configs[site] = c
                if site == "attn":
                    self._ensure_buffers()
                timed.append((c, step_time(site, c)))
                self.step_tuning.append((site, c, timed[-1][1]))
            best, sec = min(timed, key=lambda r: r[1], default=(before, 0.0))
            self.configs[site] = best if sec < float("inf") else before
            if site == "attn":
                self._ensure_buffers()

    def prepare(self) -> None:
        if self.triton_ok and self.tune and not self._tuned and type(self.cache) is KVCache:
            self.autotune()                         # (an INT8 cache: the parent's step, nothing to tune)
            self._tuned = True
            self._graph = None
        super().prepare()
