"""FastLlamaEngine: a lean batch-1 forward over a transformers Llama-family model's own weights.

What makes it fast (and what the GPU decode rows of bench/bench_gpu.py measure):
  * static KV cache (bluelm_v.nn.kv_cache), written in place; logits only for the last position
  * q|k|v and gate|up fused IN PLACE (each nn.Linear weight becomes a view of one tensor: one
    matmul instead of 3 / 2, no memory added); residual adds folded into the o/down matmuls
    (addmm); RoPE of q and k in one pass (roll + addcmul with a sign-folded sine table); fused
    RMSNorm; GQA by grouping queries per KV head (K/V never repeated)
  * a fixed-shape decode step (whole static cache + additive position mask, token and position
    in device buffers): on CUDA it is captured once as a CUDA graph and replayed per token;
    ``compile=True`` additionally compiles the per-layer function with torch.compile
Quantised projections (any module that is not exactly nn.Linear) and layers with forward hooks
(the ``a16`` activation rounding) are called as modules, never read as raw weights.
On CPU in fp32 (fp32 static cache, a C compiler present) ``forward`` takes the C-helper path of
plugins/engines/fast_cpu.py instead (RMSNorm / RoPE+cache write / SiLU / decode attention in C,
quantised q|k|v and gate|up fused, a w4/w8 decode step as direct kernel calls). Prefill computes
logits for the last chunk only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bluelm_v.model import model_dtype_device
from bluelm_v.nn.fusion import fuse_linears as _fuse
from bluelm_v.nn.fusion import hooked
from bluelm_v.nn.kv_cache import allocate_static
from bluelm_v.nn.llama import RMSNORM_CLASSES

from .batch_api import BatchAPI
from .hf import one_at_a_time


def attend(q, k, v, mask, scaling: float):
    """q [1,KV,R,d] against k/v [1,KV,S,d]. A few query rows on CPU (decode): plain matmuls,
    much cheaper there than the flash kernel; otherwise scaled_dot_product_attention."""
    if not q.is_cuda and q.shape[2] <= 16:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling                 # [1,KV,R,S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def plain_layer(x, cos, sin_s, positions, mask, kc, vc, w_in, w_qkv, w_o, w_post, w_gu, w_down, *,
                eps: float, n_heads: int, n_kv: int, head_dim: int, scaling: float, kv_len: int):
    """One Llama decoder layer from raw tensors (the path torch.compile sees): x [1,T,D],
    cos/sin_s [1,T,1,d], positions [T], kc/vc [KV,S,d] (written in place), mask [T,S] or None."""
    t, d, big = x.shape[1], head_dim, x.shape[-1]
    h = F.rms_norm(x, (big,), w_in, eps)
    qkv = F.linear(h, w_qkv)                                                 # [1,T,(H+2KV)d]
    qk = qkv[..., : (n_heads + n_kv) * d].view(1, t, n_heads + n_kv, d)
    v = qkv[..., (n_heads + n_kv) * d:].view(1, t, n_kv, d)
    qk = torch.addcmul(qk * cos, torch.roll(qk, d // 2, -1), sin_s)          # RoPE on q and k
    kc[:, positions] = qk[0, :, n_heads:].transpose(0, 1)                   # [KV,T,d]
    vc[:, positions] = v[0].transpose(0, 1)
    g = n_heads // n_kv
    q = qk[:, :, :n_heads].transpose(1, 2).reshape(1, n_kv, g * t, d)        # rows (group, t)
    m = mask.repeat(g, 1) if (mask is not None and g > 1) else mask
    o = attend(q, kc[:, :kv_len][None], vc[:, :kv_len][None], m, scaling)   # [1,KV,gT,d]
    o = o.reshape(1, n_heads, t, d).transpose(1, 2).reshape(t, n_heads * d)
    x = torch.addmm(x.reshape(t, big), o, w_o.t())                              # residual folded in
    h = F.rms_norm(x, (big,), w_post, eps)
    gate, up = F.linear(h, w_gu).chunk(2, -1)
    x = torch.addmm(x, F.silu(gate) * up, w_down.t())
    return x.view(1, t, big)


class FastLlamaEngine(BatchAPI):
    """See the module docstring. API: begin(max_len), prefill(embeds, chunk) -> [V], step(token)."""

    name = "fast"

    @staticmethod
    def supports(hf_model) -> bool:
        base = getattr(hf_model, "model", None)
        layers = getattr(base, "layers", None)
        if layers is None or not len(layers) or not hasattr(base, "rotary_emb"):
            return False
        a = layers[0].self_attn
        return all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            not hasattr(a, "q_norm") and getattr(hf_model.config, "sliding_window", None) in (None, 0)

    def __init__(self, hf_model, fuse: bool = True, cuda_graph: bool = True, compile: bool = False,
                 attention: str = "sdpa", static_step: bool = False, cpu_half_kv: bool = True,
                 batch_attention: str = "auto"):
        base, cfg = hf_model.model, hf_model.config
        self.cpu_half_kv = cpu_half_kv     # CPU decode attention over an fp16 mirror of the cache
        self.model, self.base = hf_model, base
        self.layers = list(base.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = getattr(self.layers[0].self_attn, "scaling", d ** -0.5)
        self.dtype, self.device = model_dtype_device(hf_model)
        self.attention = attention
        n_pos = int(getattr(cfg, "max_position_embeddings", 4096))
        with torch.no_grad():
            cos, sin = base.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device),
                                       torch.arange(n_pos, device=self.device)[None])
        self.cos = cos[0].contiguous()                                      # [P, d]
        sign = torch.ones(d, dtype=self.dtype, device=self.device)
        sign[: d // 2] = -1
        self.sin_signed = (sin[0] * sign).contiguous()   # rotate_half(x)*sin == roll(x, d/2)*sin_signed
        self.fuse = fuse
        self.qkv = [_fuse(l.self_attn, ("q_proj", "k_proj", "v_proj")) if fuse else None for l in self.layers]
        self.gate_up = [_fuse(l.mlp, ("gate_proj", "up_proj")) if fuse else None for l in self.layers]
        self.q_dim, self.kv_dim = self.n_heads * d, self.n_kv * d
        self.plain = [self._plain_weights(i) for i in range(len(self.layers))]
        self._consts = dict(n_heads=self.n_heads, n_kv=self.n_kv, head_dim=d, scaling=self.scaling)
        self.cache = None
        self.length = 0
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.static_step = static_step or self.use_graph
        self._graph = None
        self._step_layer_fn = plain_layer
        self.batch_attention = batch_attention   # batched decode attention: auto | sdpa | triton
        self._cpu = None      # the C-helper CPU forward (fast_cpu.py), fp32 on CPU only
        if self.device.type == "cpu" and self.dtype == torch.float32 and attention == "sdpa" and not compile:
            from bluelm_v.plugins.engines.fast_cpu import CpuPath

            cpu = CpuPath(self)
            self._cpu = cpu if cpu.lib is not None and cpu.layers is not None else None
        if compile:
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = True
            self._step_layer_fn = torch.compile(plain_layer, dynamic=False)

    def _plain_weights(self, i: int):
        """Layer i's raw weights when every part is plain (fused projections, RMSNorm, SiLU, no
        bias), else None (the module-calling path is used)."""
        layer = self.layers[i]
        a, m = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if self.qkv[i] is None or self.gate_up[i] is None or self.qkv[i][1] is not None or \
                self.gate_up[i][1] is not None or any(type(n).__name__ not in RMSNORM_CLASSES for n in norms) or \
                type(a.o_proj) is not torch.nn.Linear or type(m.down_proj) is not torch.nn.Linear or \
                hooked(a.o_proj) or hooked(m.down_proj) or \
                a.o_proj.bias is not None or m.down_proj.bias is not None or \
                getattr(self.model.config, "hidden_act", "silu") != "silu":
            return None
        eps = norms[0].variance_epsilon
        return (norms[0].weight, self.qkv[i][0], a.o_proj.weight, norms[1].weight,
                self.gate_up[i][0], m.down_proj.weight), eps

    # -- cache ----------------------------------------------------------------------------
    def begin(self, max_len: int) -> None:
        """Start a new sequence; (re)allocate the KV cache only when it does not fit."""
        if max_len > self.cos.shape[0]:
            raise ValueError(f"max_len {max_len} exceeds the model's {self.cos.shape[0]} positions")
        max_len = min(-(-max_len // 64) * 64, self.cos.shape[0])   # aligned rows for attention kernels
        if self.cache is None or self.cache.max_len < max_len or \
                (self.static_step and self.cache.max_len != max_len):
            self.cache, self._graph = None, None
            self.cache = allocate_static(self.model, len(self.layers), self.n_kv, self.head_dim,
                                         max_len, self.dtype, self.device)
            self._arange = torch.arange(max_len, device=self.device)
            self._tok = torch.zeros(1, dtype=torch.long, device=self.device)
            self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
            self._hist = torch.zeros(max_len, dtype=torch.long, device=self.device)   # token made at pos
        self.cache.reset()
        self.length = 0

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    # -- one decoder layer ----------------------------------------------------------------
    def _norm(self, module, x):
        eps, w = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
        if eps is None or type(module).__name__ not in RMSNORM_CLASSES or w is None or w.dtype != x.dtype:
            return module(x)
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    @staticmethod
    def _proj_residual(module, x, residual):
        """residual + module(x), the add folded into the matmul when module is a plain Linear."""
        if type(module) is torch.nn.Linear and module.bias is None and x.dtype == module.weight.dtype and \
                not hooked(module):
            out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]),
                              module.weight.t())
            return out.view(residual.shape)
        return residual + module(x)

    def _attention(self, q, k, v, mask):
        """q [1,H,T,d], k/v [1,KV,S,d], mask [T,S] (bool or additive) or None -> [1,H,T,d]."""
        g, t = self.n_heads // self.n_kv, q.shape[2]
        qg = q.reshape(1, self.n_kv, g * t, self.head_dim)           # rows ordered (group, t)
        m = mask.repeat(g, 1) if (mask is not None and g > 1) else mask
        if self.attention == "matmul":
            scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling   # [1,KV,gT,S]
            if m is not None:
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
            out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
        else:
            out = attend(qg, k, v, m, self.scaling)
        return out.reshape(1, self.n_heads, t, self.head_dim)

    def _layer(self, i: int, x, cos, sin_s, positions, kv_len: int, mask, fn=plain_layer):
        """Decoder layer i: x [1,T,D] at ``positions`` [T] -> [1,T,D]; writes its K/V."""
        plain = self.plain[i]
        if plain is not None and hasattr(self.cache, "k") and self.attention == "sdpa" and \
                x.dtype == plain[0][0].dtype:
            return fn(x, cos, sin_s, positions, mask, self.cache.k[i], self.cache.v[i], *plain[0],
                      eps=plain[1], kv_len=kv_len, **self._consts)
        layer, t, d = self.layers[i], x.shape[1], self.head_dim
        attn, h, kv = layer.self_attn, self._norm(layer.input_layernorm, x), self.n_heads + self.n_kv
        if self.qkv[i] is not None:
            qkv = F.linear(h, *self.qkv[i])                                  # [1,T,(H+2KV)d]
            qk = qkv[..., : self.q_dim + self.kv_dim].view(1, t, kv, d)
            v = qkv[..., self.q_dim + self.kv_dim:].view(1, t, self.n_kv, d)
        else:
            qk = torch.cat([attn.q_proj(h), attn.k_proj(h)], -1).view(1, t, kv, d)
            v = attn.v_proj(h).view(1, t, self.n_kv, d)
        qk = torch.addcmul(qk * cos, torch.roll(qk, d // 2, -1), sin_s)      # RoPE on q and k
        q = qk[:, :, : self.n_heads].transpose(1, 2)                         # [1,H,T,d]
        k = qk[:, :, self.n_heads:].transpose(1, 2)                          # [1,KV,T,d]
        keys, values = self.cache.write_read(i, positions, k[0], v[0].transpose(0, 1), kv_len)
        o = self._attention(q, keys, values, mask).transpose(1, 2).reshape(1, t, self.q_dim)
        x = self._proj_residual(attn.o_proj, o, x)
        h = self._norm(layer.post_attention_layernorm, x)
        if self.gate_up[i] is not None:
            gate, up = F.linear(h, *self.gate_up[i]).chunk(2, -1)
            return self._proj_residual(layer.mlp.down_proj, layer.mlp.act_fn(gate) * up, x)
        return x + layer.mlp(h)

    def _blocks(self, x, positions, kv_len: int, mask, fn=plain_layer):
        cos = self.cos.index_select(0, positions)[None, :, None]             # [1,T,1,d]
        sin_s = self.sin_signed.index_select(0, positions)[None, :, None]
        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin_s, positions, kv_len, mask, fn)
        return x

    def _logits(self, x):
        return self.model.lm_head(self._norm(self.base.norm, x[:, -1:]))[0, -1]   # [V]

    # -- prefill and decode ---------------------------------------------------------------
    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, logits: bool = True, decode: bool = False) -> torch.Tensor | None:
        """[1,T,D] at the next T positions -> [V] logits of the last one (None if not ``logits``).
        ``decode``: a generation step (the CPU path may then attend over its fp16 cache mirror;
        prefill, even one row at a time, stays in fp32)."""
        t, start = embeds.shape[1], self.length
        if start + t > self.cache.max_len:
            raise ValueError(f"KV cache of {self.cache.max_len} positions is full")
        if self._cpu is not None and embeds.device.type == "cpu" and self._cpu.usable:
            x2 = embeds.reshape(t, -1).to(self.dtype).contiguous()                       # [T,D]
            x = self._cpu.forward(x2, start, decode)
            self.length = self.cache.length = start + t
            return self._logits(x[None]).float() if logits else None
        positions = torch.arange(start, start + t, device=self.device)
        mask = None
        if t > 1:   # causal within the chunk, everything before it visible
            mask = self._arange[:start + t][None] <= positions[:, None]   # [T, start+T]
        x = self._blocks(embeds.to(self.dtype), positions, start + t, mask)
        self.length = self.cache.length = start + t
        return self._logits(x).float() if logits else None

    def prefill(self, embeds: torch.Tensor, chunk: int) -> torch.Tensor:
        """Consume [1,L,D] ``chunk`` rows at a time -> [V] logits of the last position (only the
        last chunk computes logits)."""
        n = embeds.shape[1]
        starts = list(range(0, n, chunk))
        logits = None
        for start in starts:
            logits = self.forward(embeds[:, start:start + chunk], logits=start == starts[-1])
        return logits

    def _static_step(self):
        """Fixed shapes: token buffer -> next token buffer over the whole cache, position += 1."""
        emb = self.base.embed_tokens(self._tok)[None]                        # [1,1,D]
        mask = torch.zeros(1, self.cache.max_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(self._arange[None] > self._pos, float("-inf"))     # [1,S] additive
        x = self._blocks(emb, self._pos, self.cache.max_len, mask, self._step_layer_fn)
        nxt = self._logits(x).argmax(-1, keepdim=True)                       # [1]
        self._tok.copy_(nxt)
        self._hist.index_copy_(0, self._pos, nxt.reshape(1))
        self._pos.add_(1)
        return nxt

    def _capture(self):
        """Capture the step. Its 3 warm-up steps (compile, allocate) run at rows p..p+2 past the
        filled part where they fit (else the last 3), and those rows, the token and the position
        are put back afterwards: warming up never changes the sequence."""
        saved_tok, saved_pos = self._tok.clone(), self._pos.clone()
        p = max(0, min(self.length, self.cache.max_len - 3))
        rows = [(t, t[:, :, p:p + 3].clone()) for t in vars(self.cache).values()     # [L, KV, S, ...]
                if torch.is_tensor(t) and t.dim() >= 3 and t.shape[2] == self.cache.max_len]
        self._pos.fill_(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):     # warm-up (and compile)
                self._static_step()
        torch.cuda.current_stream().wait_stream(side)
        for t, kept in rows:
            t[:, :, p:p + 3] = kept
        self._tok.copy_(saved_tok)
        self._pos.copy_(saved_pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self._static_step()
        self._graph = graph

    def prepare(self) -> None:
        """Capture the CUDA graph now (before anything is timed), if graphs are used."""
        if self.use_graph and self._graph is None:
            self._capture()

    @property
    def decode_chunk(self) -> int:
        """Tokens worth asking ``steps`` for at once: replayed graphs need no host round trip."""
        return 8 if self.use_graph else 1

    @torch.no_grad()
    def steps(self, token: int, n: int) -> list[int]:
        """n greedy steps from ``token`` -> the n tokens. With a CUDA graph the step feeds itself
        (token and position stay on the device), so the n replays are queued back to back and
        the tokens read once at the end; otherwise n calls of ``step``."""
        if not self.use_graph or n <= 1:
            return one_at_a_time(self.step, token, n)
        start = self._static_steps(token, n)
        return self._hist[start:start + n].tolist()

    def _static_steps(self, token: int, n: int) -> int:
        """n fixed-shape steps from ``token`` (graph replays where captured), their tokens in
        ``_hist`` -> the position of the first."""
        if self.length + n > self.cache.max_len:
            raise ValueError(f"KV cache of {self.cache.max_len} positions is full "
                             f"({self.length} used, {n} more asked for)")
        if self.use_graph:
            self.prepare()                              # before the inputs are set: it may replay
        start = self.length
        self._tok.fill_(token)
        self._pos.fill_(start)
        for _ in range(n):
            if self.use_graph:
                self._graph.replay()
            else:
                self._static_step()
        self.length = self.cache.length = start + n
        return start

    @torch.no_grad()
    def step(self, token: int) -> int:
        if self.static_step:
            return int(self._hist[self._static_steps(token, 1)].item())
        emb = self.base.embed_tokens(torch.tensor([[token]], device=self.device))   # [1,1,D]
        self.last_logits = self.forward(emb, decode=True)
        return int(self.last_logits.argmax())

    def _new_batch(self):
        """Batches of sequences over these weights (plugins/engines/batch_api.py, batched.py)."""
        from .batched import BatchedLlama

        return BatchedLlama(self, self.batch_attention)
