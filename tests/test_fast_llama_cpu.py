"""FastLlamaEngine's CPU path: the C layer helpers against torch, and the engine against its torch path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bluelm_v.nn.kernels import cpu_layer_ops
from bluelm_v.nn.kernels import cpu_quant as cpu_kernels

lib = cpu_layer_ops.library()
needs_lib = pytest.mark.skipif(lib is None, reason="no C compiler for the CPU layer helpers")


@needs_lib
def test_rmsnorm_and_silu_mul_match_torch():
    torch.manual_seed(0)
    x, w = torch.randn(5, 40), torch.rand(40) + 0.5
    out = torch.empty_like(x)
    lib.rmsnorm(x.data_ptr(), 5, 40, w.data_ptr(), 1e-5, out.data_ptr(), 2)
    torch.testing.assert_close(out, F.rms_norm(x, (40,), w, 1e-5), rtol=1e-5, atol=1e-6)
    gu = torch.randn(3, 2 * 24)
    act = torch.empty(3, 24)
    lib.silu_mul(gu.data_ptr(), 3, 24, act.data_ptr(), 2)
    torch.testing.assert_close(act, F.silu(gu[:, :24]) * gu[:, 24:], rtol=1e-5, atol=1e-6)


@needs_lib
def test_rope_qkv_groups_q_and_writes_k_v_into_the_cache():
    torch.manual_seed(1)
    t, heads, kv, d, s, start = 3, 6, 2, 8, 10, 4
    qkv = torch.randn(t, (heads + 2 * kv) * d)
    cos, sin = torch.randn(t, d), torch.randn(t, d)
    q = torch.empty(kv, heads // kv * t, d)
    kc, vc = torch.zeros(kv, s, d), torch.zeros(kv, s, d)
    lib.rope_qkv(qkv.data_ptr(), t, heads, kv, d, cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                 kc.data_ptr(), vc.data_ptr(), s, start, 2)
    x = qkv.view(t, heads + 2 * kv, d)
    rot = x[:, : heads + kv] * cos[:, None] + torch.roll(x[:, : heads + kv], d // 2, -1) * sin[:, None]
    torch.testing.assert_close(q.view(heads, t, d), rot[:, :heads].transpose(0, 1))
    torch.testing.assert_close(kc[:, start:start + t], rot[:, heads:].transpose(0, 1))
    torch.testing.assert_close(vc[:, start:start + t], x[:, heads + kv:].transpose(0, 1))
    assert kc[:, :start].abs().sum() == 0 and vc[:, start + t:].abs().sum() == 0


@needs_lib
@pytest.mark.parametrize("kv_len", [37, 700])          # 700: keys split between the threads
def test_attn_decode_matches_softmax_attention(kv_len):
    torch.manual_seed(2)
    heads, kv, d, s = 6, 2, 16, 800
    q = torch.randn(heads, d)
    kc, vc = torch.randn(kv, s, d), torch.randn(kv, s, d)
    out = torch.empty(heads * d)
    scratch = torch.empty(2 * heads * (d + 2) + heads // kv * s)
    lib.attn_decode(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), heads, kv, d, s, kv_len, d ** -0.5,
                    out.data_ptr(), scratch.data_ptr(), 2)
    k = kc[:, :kv_len].repeat_interleave(heads // kv, 0)                       # [H, S, d]
    v = vc[:, :kv_len].repeat_interleave(heads // kv, 0)
    ref = torch.softmax((k @ q[:, :, None])[..., 0] / math.sqrt(d), -1)[:, None] @ v   # [H,1,d]
    torch.testing.assert_close(out.view(heads, d), ref[:, 0], rtol=1e-4, atol=1e-5)


def _tiny_llm(seed=0):
    from bluelm_v.plugins import llms

    torch.manual_seed(seed)
    model = llms.hf_causal(preset="tiny", tokenizer="byte").model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def _run(engine, emb, chunk, steps):
    engine.begin(emb.shape[1] + steps + 1)
    logits = engine.prefill(emb, chunk)
    tok, toks = int(logits.argmax()), []
    for _ in range(steps):
        tok = engine.step(tok)
        toks.append(tok)
    return logits, toks


@needs_lib
def test_cpu_path_matches_the_torch_path_and_computes_logits_once_per_prefill():
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    model = _tiny_llm()
    emb = model.get_input_embeddings()(torch.randint(3, 300, (1, 300)))       # [1,300,64]
    fast = FastLlamaEngine(model)
    assert fast._cpu is not None                    # usable once begin() allocates the fp32 cache
    calls, c_rows = [], []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    c_forward = fast._cpu.forward
    fast._cpu.forward = lambda x, start, *a: c_rows.append(x.shape[0]) or c_forward(x, start, *a)
    got, got_toks = _run(fast, emb, 128, 0)
    handle.remove()
    assert c_rows == [128, 128, 44]                 # every chunk went through the C-helper path
    assert len(calls) == 1                          # 3 chunks, logits of the last one only
    ref_engine = FastLlamaEngine(model)
    ref_engine._cpu = None                          # the generic torch path
    ref, ref_toks = _run(ref_engine, emb, 128, 6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    got, got_toks = _run(fast, emb, 128, 6)
    assert got_toks == ref_toks and len(set(ref_toks)) > 1


@needs_lib
@pytest.mark.parametrize("quantizer", [dict(name="w4", group_size=32), dict(name="w8"),
                                       dict(name="w4", group_size=32, kernel="cpu_lowp")])
def test_quantised_projections_are_fused_into_views_and_decode_like_transformers(quantizer, monkeypatch):
    from bluelm_v.plugins.engines.hf import HFEngine
    from bluelm_v.plugins.engines.fast import FastLlamaEngine
    from bluelm_v.plugin_manager import get

    model = _tiny_llm(seed=3)
    q = dict(quantizer)
    get()[1].quantizer.create(q.pop("name"), targets=["llm"], **q).apply(model)
    emb = model.get_input_embeddings()(torch.randint(3, 300, (1, 40)))
    hf_logits, hf_toks = _run(HFEngine(model), emb, 16, 6)
    fast = FastLlamaEngine(model)
    assert fast._cpu is not None
    attn = model.model.layers[0].self_attn
    fused_qkv = fast._cpu.layers[0][2]
    assert fused_qkv.out_features == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    base = fused_qkv.qweight.data_ptr()             # the originals are views of the fused codes
    assert attn.q_proj.qweight.data_ptr() == base
    assert attn.k_proj.qweight.untyped_storage().data_ptr() == fused_qkv.qweight.untyped_storage().data_ptr()
    calls, lowp = [], quantizer.get("kernel") == "cpu_lowp" and cpu_kernels.q8_gemv() is not None
    if lowp:
        q8 = cpu_kernels.q8_gemv()
        monkeypatch.setattr(cpu_kernels, "_VNNI", [cpu_kernels.library(), lambda *a: calls.append(1) or q8(*a)])
    logits, toks = _run(fast, emb, 16, 6)
    assert len(fast._cpu._direct) == len(model.model.layers)   # decode took the direct C calls
    if lowp:
        assert len(calls) >= 6 * 2 * len(model.model.layers)   # int8-activation GEMVs: qkv and gate|up, every step
    torch.testing.assert_close(logits, hf_logits, rtol=1e-3, atol=1e-3)
    assert toks == hf_toks


@pytest.mark.parametrize("start", [0, 5, 40])
def test_chunk_attention_equals_one_masked_softmax(start):
    from bluelm_v.plugins.engines.fast_cpu import chunk_attention

    torch.manual_seed(3)
    kv, g, t, d, s = 2, 3, 6, 16, 64
    q = torch.randn(1, kv, g * t, d)                                          # rows (group, t)
    kc, vc = torch.randn(1, kv, s, d), torch.randn(1, kv, s, d)
    diag = torch.full((t, t), float("-inf")).triu_(1).repeat(g, 1)            # [g*T, T]
    got = chunk_attention(q, kc, vc, start, t, diag, 0.3)
    end = start + t
    scores = (q @ kc[:, :, :end].transpose(-1, -2)) * 0.3                     # [1, KV, gT, end]
    row_t = torch.arange(g * t) % t                                           # each row's position in the chunk
    visible = torch.arange(end)[None] <= (start + row_t)[:, None]             # [gT, end]
    ref = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vc[:, :, :end]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_lib
def test_loading_the_c_libraries_keeps_denormals_in_torch():
    # -ffast-math at link time would add GCC's crtfastmath: flush-to-zero for the whole process
    from bluelm_v.nn.kernels import cpu_quant as cpu_kernels

    assert cpu_kernels.library() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)                 # a float32 denormal
    assert float(tiny * 1.0) != 0.0 and float(tiny / 2) != 0.0


@needs_lib
@pytest.mark.skipif(cpu_layer_ops.library() is None or cpu_layer_ops.library().has_fast_f16() != 1,
                    reason="the fp16 mirror kernel needs AVX-512 + F16C (this CPU decodes over the fp32 cache)")
def test_decode_over_the_fp16_mirror_follows_the_fp32_cache_through_a_rewind():
    from bluelm_v.plugins.engines.fast import FastLlamaEngine

    rels = []

    model = _tiny_llm(seed=5)
    emb = model.get_input_embeddings()(torch.randint(3, 300, (1, 90)))         # [1,90,64]
    half, full = FastLlamaEngine(model), FastLlamaEngine(model, cpu_half_kv=False)
    calls = []
    lib = half._cpu.lib
    half._cpu.lib = type("Spy", (), {"__getattr__": lambda self, n: (calls.append(n) if n.startswith(
        "attn_decode") else None) or getattr(lib, n)})()
    for eng in (half, full):
        eng.begin(120)
        eng.prefill(emb[:, :60], 32)
    tok = 7
    for _ in range(4):                                     # rows 60..63: the prompt mirrored, then one a step
        a, b = half.step(tok), full.step(tok)
        rel = ((half.last_logits - full.last_logits).norm() / full.last_logits.norm()).item()
        assert rel < 5e-3, rel                             # fp16 keys/values: 11-bit mantissas
        rels.append(rel)
        assert a == b
        tok = a
    assert calls and set(calls) == {"attn_decode_f16"}
    assert half._cpu._synced == 64
    # rewind: rows 50.. rewritten by a prefill of other tokens; decode must see the new rows
    for eng in (half, full):
        eng.length = eng.cache.length = 50
        eng.forward(emb[:, 60:90])                       # rows 50..79
    assert half._cpu._synced == 50
    for _ in range(3):
        a, b = half.step(tok), full.step(tok)
        rel = ((half.last_logits - full.last_logits).norm() / full.last_logits.norm()).item()
        assert rel < 5e-3, rel                             # fp16 keys/values: 11-bit mantissas
        rels.append(rel)
        tok = a
    kh = half._cpu.mirrored_keys()
    torch.testing.assert_close(kh[:, :, :83].float(), half.cache.k[:, :, :83], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(half._cpu._half[1][:, :, :83].float(), half.cache.v[:, :, :83], rtol=1e-3, atol=1e-3)
    assert max(rels) > 0                                   # the mirror really was read
