"""bluelm_v.plugins.engines.triton_step: the pure-torch pieces always; the Triton decode step only where Triton
can run (a CUDA device, or TRITON_INTERPRET=1 set before pytest starts: slow, tiny model)."""
from __future__ import annotations

import os

import pytest
import torch

from bluelm_v.plugins.engines.triton_step import AttnConfig, GemvConfig, gemv_candidates, split_attention_reference


def test_split_attention_reference_equals_full_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 16), torch.randn(3, 37, 16), torch.randn(3, 37, 16)
    full = torch.softmax(torch.einsum("hd,hld->hl", q, k) * 0.25, -1)
    expected = torch.einsum("hl,hld->hd", full, v)                        # [H,d]
    for n_split in (1, 3, 8):
        got = split_attention_reference(q, k, v, n_split, 0.25)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gemv_split_k_candidates_cover_k_in_whole_pieces():
    for n, k in ((2304, 2304), (2304, 5760)):
        for cfg in gemv_candidates(n, k, (1, 2, 3, 5)):
            per = cfg.k_per_split(k)
            assert per % cfg.block_k == 0
            assert per * cfg.split_k >= k > per * (cfg.split_k - 1)     # every split has columns
    assert GemvConfig(8, 128, 3).k_per_split(5760) == 1920


def test_gemv_head_is_a_power_of_two_within_the_split():
    assert GemvConfig(16, 128, 6, pre=2).head_k(2304) == 256            # split of 384 columns
    assert GemvConfig(16, 128, 6, pre=4).head_k(2304) == 256            # capped by the split
    assert GemvConfig(16, 256, pre=8).head_k(2304) == 2048
    assert GemvConfig(8, 64).head_k(64) == 64


def test_attention_splits_cover_the_cache():
    for max_len in (64, 2240, 4096):
        for cfg in (AttnConfig(32), AttnConfig(64), AttnConfig(128)):
            n = cfg.n_split(max_len)
            assert (n - 1) * cfg.block < max_len <= n * cfg.block


def _triton_runnable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not _triton_runnable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("configs, prefetch", [
    ({"attn": AttnConfig(8), "down": GemvConfig(8, 64, 2)}, True),               # fused merge, 1 tile early
    ({"attn": AttnConfig(8, fused_merge=False), "qkv": GemvConfig(8, 16, pre=2),  # merge kernel; wide heads
      "down": GemvConfig(8, 32, 2, pre=4), "lm": GemvConfig(16, 16, pre=8)}, True),
    ({"attn": AttnConfig(16, num_warps=1), "gu": GemvConfig(8, 16, pre=2),       # new row mid-block;
      "qkv": GemvConfig(8, 16, depth=2), "down": GemvConfig(4, 16, 2, depth=2)}, True),   # 2 tiles in flight
    ({"qkv": GemvConfig(8, 16, depth=2), "down": GemvConfig(4, 16, 2)}, False)],  # one tile at a time
    ids=["fused-merge", "merge-kernel-wide-head", "one-warp-attention", "no-prefetch"])
def test_triton_step_matches_torch_path(configs, prefetch):
    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine
    from bluelm_v.plugins.engines.fast import FastLlamaEngine
    from bluelm_v.plugins import llms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = llms.hf_causal(preset="tiny", dtype="float32", device=device, tokenizer="byte").model.eval()
    emb = model.get_input_embeddings()(torch.randint(3, 300, (1, 21), device=device))   # [1,21,64]
    ref = FastLlamaEngine(model, cuda_graph=False, static_step=False)
    eng = TritonDecodeEngine(model, cuda_graph=False, debug_logits=True, tune=False, prefetch=prefetch,
                             configs=configs)
    assert eng.triton_ok
    ref.begin(40)
    eng.begin(40)
    tok = int(ref.prefill(emb, 8).argmax())
    assert int(eng.prefill(emb, 8).argmax()) == tok
    for _ in range(3):          # positions 21..23: splits 0-2 of 8 keys each, row pos substituted
        a, b = ref.step(tok), eng.step(tok)
        torch.testing.assert_close(eng.last_step_logits, ref.last_logits, rtol=1e-4, atol=1e-4)
        assert a == b
        tok = a
    # the new k/v rows were written where the torch path writes them
    torch.testing.assert_close(eng.cache.k[:, :, :24], ref.cache.k[:, :, :24], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eng.cache.v[:, :, :24], ref.cache.v[:, :, :24], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("engine", ["graph", "triton", "triton-tuned"])
def test_graph_steps_give_the_tokens_and_cache_of_eager_steps(engine):
    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine
    from bluelm_v.plugins.engines.fast import FastLlamaEngine
    from bluelm_v.plugins import llms

    torch.manual_seed(0)
    model = llms.hf_causal(preset="tiny", dtype="float32", device="cuda", tokenizer="byte").model.eval()
    emb = model.get_input_embeddings()(torch.randint(3, 300, (1, 21), device="cuda"))
    make = {"graph": lambda: FastLlamaEngine(model), "triton": lambda: TritonDecodeEngine(model, tune=False),
            "triton-tuned": lambda: TritonDecodeEngine(model, tune_budget_s=3.0)}[engine]
    one, many = FastLlamaEngine(model, cuda_graph=False, static_step=False), make()   # reference: no graph
    assert many.decode_chunk > 1 and one.decode_chunk == 1
    for eng in (one, many):
        eng.begin(40)
    tok = int(one.prefill(emb, 8).argmax())
    assert int(many.prefill(emb, 8).argmax()) == tok
    singles, t = [], tok
    for _ in range(6):
        t = one.step(t)
        singles.append(t)
    assert many.steps(tok, 4) + many.steps(singles[3], 2) == singles      # captured (and tuned) after prefill
    assert many.length == one.length == 27
    # capturing, warming up and tuning left the prompt's rows alone: the caches hold the same sequence
    torch.testing.assert_close(many.cache.k[:, :, :27], one.cache.k[:, :, :27], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(many.cache.v[:, :, :27], one.cache.v[:, :, :27], rtol=1e-4, atol=1e-4)


def _tiny_engine(**kw):
    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine
    from bluelm_v.plugins import llms

    torch.manual_seed(0)
    model = llms.hf_causal(preset="tiny", dtype="float32", device="cpu", tokenizer="byte").model.eval()
    eng = TritonDecodeEngine(model, cuda_graph=False, tune=False, **kw)
    eng.begin(40)
    return eng


def test_tuning_keeps_whole_step_winner_fixed_sites_and_state():
    """autotune's control flow with the timers replaced (no GPU needed): the whole step decides
    between a site's best few, a fixed site is left alone, a site whose candidates all fail keeps
    its default, and the token, position, history and the cache row it writes are put back."""
    from bluelm_v.plugins.engines.triton_step import DEFAULTS, STEP_REPLAYS

    fixed_o = GemvConfig(8, 64)
    eng = _tiny_engine(configs={"o": fixed_o}, debug_logits=True)
    hist = torch.arange(eng._hist.numel())
    eng._tok.fill_(11), eng._pos.fill_(21), eng._hist.copy_(hist)
    row_k = eng.cache.k[:, :, -2].clone()
    order: dict[str, dict] = {}

    def site_time(site, cfg, pos):              # per site: candidates in the order first timed
        if site == "down":
            raise RuntimeError("does not build")
        ranks = order.setdefault(site, {})
        return 1.0 + ranks.setdefault(cfg, len(ranks))
    seen_debug = []

    def step_time(run, reset=None, replays=5):  # the whole step: what a real replay disturbs
        assert replays == STEP_REPLAYS
        reset()
        seen_debug.append(eng.debug_logits)
        eng._tok.fill_(5), eng._hist.fill_(-7)
        eng.cache.k[:, :, -2] = 99.0
        second_qkv = next(c for c, i in order["qkv"].items() if i == 1)
        return 0.5 if eng.configs["qkv"] == second_qkv else 1.0
    eng._time_site, eng._time_graph = site_time, step_time
    tuning = eng.autotune()

    assert "o" not in tuning and eng.configs["o"] == fixed_o
    assert eng.configs["down"] == DEFAULTS["down"] and all(t == float("inf") for _, t in tuning["down"])
    assert eng.configs["qkv"] == next(c for c, i in order["qkv"].items() if i == 1)     # the step's pick
    assert eng.configs["gu"] == next(c for c, i in order["gu"].items() if i == 0)       # per site: first
    sites = [s for s, _, _ in eng.step_tuning]
    assert sites.count("attn") == 4 and sites.count("qkv") == 3 and "down" not in sites and "o" not in sites
    assert seen_debug and not any(seen_debug) and eng.debug_logits
    assert int(eng._tok) == 11 and int(eng._pos) == 21 and torch.equal(eng._hist, hist)
    torch.testing.assert_close(eng.cache.k[:, :, -2], row_k)


def test_int8_cache_is_not_tuned():
    """An INT8 KV cache runs the parent's step: prepare() must not tune the Triton kernels."""
    from bluelm_v.nn.kv_cache import Int8StaticKVCache

    eng = _tiny_engine()
    eng.cache = Int8StaticKVCache.allocate(len(eng.layers), eng.n_kv, eng.head_dim, 40, eng.dtype, eng.device)
    eng.triton_ok, eng.tune = True, True

    def fail():
        raise AssertionError("autotune ran on an INT8 cache")
    eng.autotune = fail
    eng.prepare()
    assert not eng._tuned


# -- INT4 / INT8 weights in the Triton step (plugins/engines/triton_quant.py) -------------------
def _quantised_tiny(symmetric: bool, embedding_bits, group: int = 32):
    from bluelm_v.plugins import llms
    from bluelm_v.plugins.quantizers.schemes import W4

    torch.manual_seed(0)
    model = llms.hf_causal(preset="tiny", dtype="float32", device="cpu", tokenizer="byte").model.eval()
    with torch.no_grad():   # larger than the 0.02 init: logits that really differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    W4(["all"], group_size=group, symmetric=symmetric, embedding_bits=embedding_bits).apply(
        torch.nn.ModuleDict({"llm": model}))
    return model


@pytest.mark.skipif(not _triton_runnable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits, symmetric, group, prologue, epilogue, cfg", [
    (4, False, 32, 1, 0, GemvConfig(8, 64)),          # RMSNorm prologue, two groups a tile
    (4, True, 64, 2, 1, GemvConfig(4, 64, 2)),        # SiLU(gate)*up, split-K, atomic add
    (4, False, 32, 0, 2, GemvConfig(16, 32)),         # argmax epilogue, one group a tile
    (8, True, 1, 1, 2, GemvConfig(16, 32))],          # the INT8 head
    ids=["q4-norm", "q4-silu-splitk", "q4-argmax", "q8-head"])
def test_quantised_gemv_kernels_equal_the_dequantised_matvec(bits, symmetric, group, prologue, epilogue, cfg):
    from bluelm_v.nn.quant_linear import Int4Linear, Int8Linear
    from bluelm_v.plugins.engines.triton_quant import QWeight, gemv_quant

    torch.manual_seed(1)
    n, k = 40, 128
    lin = torch.nn.Linear(k, n, bias=False)
    mod = Int4Linear.from_linear(lin, group, symmetric) if bits == 4 else Int8Linear.from_linear(lin)
    w = mod.dequantize()                                                   # [N,K] fp32
    x, nw = torch.randn(2 * k), torch.rand(k) + 0.5

    class Eng:                         # what gemv_quant reads of the engine
        dtype, _part_idx = torch.float32, torch.zeros(n, dtype=torch.int32)

        @staticmethod
        def _launch_opts(num_warps):
            return dict(num_warps=num_warps, PDL=False)
    if prologue == 1:
        xin = x[:k] * nw / (x[:k].pow(2).mean() + 1e-5).sqrt()
    elif prologue == 2:
        xin = torch.nn.functional.silu(x[:k]) * x[k:]
    else:
        xin = x[:k]
    want = w @ xin                                                         # [N]
    out = torch.zeros(n) if epilogue != 1 else torch.full((n,), 3.0)
    gemv_quant(Eng, cfg, QWeight.of(mod), x, out, prologue, epilogue, nw, 1e-5)
    if epilogue == 0:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    elif epilogue == 1:
        torch.testing.assert_close(out, want + 3.0, rtol=1e-4, atol=1e-4)
    else:                              # per block of block_n rows: its max and where
        blocks = want.split(cfg.block_n)
        torch.testing.assert_close(out[:len(blocks)], torch.stack([b.max() for b in blocks]), rtol=1e-4, atol=1e-4)
        assert Eng._part_idx[:len(blocks)].tolist() == [i * cfg.block_n + int(b.argmax()) for i, b in enumerate(blocks)]


@pytest.mark.slow
@pytest.mark.skipif(not _triton_runnable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("symmetric, embedding_bits", [(False, 8), (True, 4)], ids=["asym-int8-head", "sym-int4-head"])
def test_triton_int4_step_decodes_the_tokens_of_the_dequantised_model(symmetric, embedding_bits):
    """The whole INT4 step (fused q|k|v and gate|up INT4 GEMVs, quantised head and embedding)
    against the fast engine's torch step on the same weights dequantised to plain Linears."""
    import copy

    from bluelm_v.plugins.engines.fast import FastLlamaEngine
    from bluelm_v.plugins.engines.triton_quant import QWeight, dequantized
    from bluelm_v.plugins.engines.triton_step import TritonDecodeEngine

    model = _quantised_tiny(symmetric, embedding_bits)
    plain = dequantized(copy.deepcopy(model))
    assert type(plain.lm_head) is torch.nn.Linear and plain.model.embed_tokens.weight is plain.lm_head.weight
    emb = plain.get_input_embeddings()(torch.randint(3, 300, (1, 21)))
    ref = FastLlamaEngine(plain, cuda_graph=False, static_step=False)
    eng = TritonDecodeEngine(model, cuda_graph=False, debug_logits=True, tune=False, configs={
        "attn": AttnConfig(8), "qkv": GemvConfig(8, 64), "gu": GemvConfig(4, 64), "o": GemvConfig(8, 32, 2),
        "down": GemvConfig(8, 32, 2), "lm": GemvConfig(16, 64)})
    assert eng.triton_ok and isinstance(eng.step_w[0][0][1], QWeight) and eng.step_w[0][0][1].bits == 4
    assert isinstance(eng.lm_w, QWeight) and eng.lm_w.bits == embedding_bits
    ref.begin(40)
    eng.begin(40)
    tok = int(ref.prefill(emb, 8).argmax())
    assert int(eng.prefill(emb, 8).argmax()) == tok
    for _ in range(2):
        a, b = ref.step(tok), eng.step(tok)
        torch.testing.assert_close(eng.last_step_logits, ref.last_logits, rtol=1e-4, atol=1e-4)
        assert a == b
        tok = a


@pytest.mark.skipif(not _triton_runnable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_batched_triton_attention_decodes_the_tokens_of_sdpa():
    """plugins/engines/batched.py with its Triton decode attention (each row attends only its own
    keys, split in blocks of 64) against scaled_dot_product_attention over the masked window:
    rows of different lengths, then a row dropped (its slot compacted away)."""
    from bluelm_v.plugins import llms
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = llms.hf_causal(preset="tiny", dtype="float32", device=device, tokenizer="byte").model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    embeds = [model.get_input_embeddings()(torch.randint(3, 300, (1, n), device=device)) for n in (70, 9, 33)]
    runs = []
    for attention in ("sdpa", "triton"):
        eng = FastLlamaEngine(model, cuda_graph=False, batch_attention=attention)
        eng.begin_batch(3, 80)
        first = eng.prefill_batch(embeds, 64).argmax(-1).tolist()
        a = eng.steps_batch([0, 1, 2], first, 3)
        b = eng.steps_batch([0, 2], [a[0][-1], a[2][-1]], 4)            # row 1 done: 2 slots left
        runs.append((first, a, b))
        assert eng._batched.triton_attn == (attention == "triton") and eng._batched.bucket == 2
    assert runs[0] == runs[1]


@pytest.mark.skipif(not _triton_runnable(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_triton_engine_takes_a_w4_model_into_its_int4_step():
    """engine=triton honours w4 (its quantised GEMVs run the codes) instead of refusing it."""
    from bluelm_v.plugins.engines import triton_engine
    from bluelm_v.plugins.engines.triton_quant import QWeight

    eng = triton_engine(_quantised_tiny(False, 8), tune=False)
    assert eng.triton_ok and all(isinstance(w, QWeight) for w in (eng.step_w[0][0][1], eng.step_w[0][0][5], eng.lm_w))
