"""Quantizers: packing formats, kernels, streaming replacement, checkpoints, KV cache, a16, registry."""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bluelm_v.errors import ConfigError, InputError
from bluelm_v.nn import activation_quant as activation, packing, quant_io as io
from bluelm_v.nn.kernels import cpu_quant as cpu_kernels, quant_matmul as kernels
from bluelm_v.nn.kv_cache_hf import Int8KVCache, Int8StaticKVCache, quantize_per_token
from bluelm_v.nn.quant_linear import Int4Linear, Int8Linear, QuantEmbedding
from bluelm_v.plugins.quantizers.schemes import A16, KV8, W4, W8, kv_cache_kind, weight_bytes

CONF = Path(__file__).resolve().parents[1] / "conf" / "quantizer"


class TinyLM(nn.Module):
    """Embedding + an MLP + an lm_head tied to the embedding (like SmolLM2)."""

    def __init__(self, vocab=96, dim=64, hidden=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.down(F.gelu(self.up(h))))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- formats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(symmetric, group):
    torch.manual_seed(group + symmetric)   # deterministic; the bounds hold for any seed (checked on 3000)
    w = torch.randn(16, 256)
    p, s, z = packing.quantize_int4(w, group, symmetric)
    d = packing.dequantize_int4(p, s, z, group)
    step = s.float().abs().repeat_interleave(group, dim=1)
    assert p.dtype == torch.uint8 and p.shape == (16, 128)
    err, tol = (d - w).abs(), 1e-3 * step + 1e-6
    # symmetric: the largest-magnitude value maps exactly to -8, so values of the opposite sign
    # beyond +7 steps clip (llama.cpp Q4_0 does the same): at most one step there
    unclipped = packing.unpack_int4(p) != 15 if symmetric else torch.ones_like(w, dtype=torch.bool)
    assert (err[unclipped] <= step[unclipped] / 2 + tol[unclipped]).all()
    # a clipped +8 -> +7 is one step off, plus up to 8 steps' worth of the fp16 rounding of the scale
    assert (err <= step * (1 + 8 * 2.0 ** -11) + 1e-6).all()
    assert (z is None) == symmetric


def test_pack_unpack_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = packing.pack_int4(codes)
    assert torch.equal(packing.unpack_int4(packed), codes)
    assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 1].item() << 4)


def test_int8_per_channel_error_bound():
    w = torch.randn(32, 100) * torch.linspace(0.01, 3, 32)[:, None]
    q, s = packing.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (32,)
    assert ((packing.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_w4_buffer_is_an_eighth_of_fp32():
    lin = nn.Linear(512, 256, bias=False)
    q = Int4Linear.from_linear(lin, group_size=128, symmetric=True)
    assert q.qweight.numel() * q.qweight.element_size() == 512 * 256 * 4 // 8
    assert q.weight_bytes() < 512 * 256 * 4 / 7.5   # + fp16 scales: 1/128 of the codes' count


# -- kernels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 8, 9, 37])
@pytest.mark.parametrize("cls,kw", [(Int4Linear, {"group_size": 32}), (Int4Linear, {"group_size": 64, "symmetric": True}),
                                    (Int8Linear, {})])
def test_every_cpu_path_matches_the_dequantised_matmul(m, cls, kw):
    lin = nn.Linear(192, 83)                              # 83 rows: not a multiple of the 4-row blocks
    q = cls.from_linear(lin, **kw)
    x = torch.randn(2, m, 192)
    ref = F.linear(x, q.dequantize(), lin.bias)
    for kernel in ("auto", "cpu_fused", "cpu_tiled", "dequant"):
        q.kernel = kernel
        assert rel(q(x), ref) < 1e-5, kernel


@pytest.mark.skipif(cpu_kernels.library() is None, reason="needs the C kernels")
@pytest.mark.parametrize("cls,kw", [(Int4Linear, {"group_size": 64}), (Int8Linear, {})])
def test_bf16_prefill_kernel_is_a_bf16_gemm_and_leaves_decode_in_fp32(cls, kw):
    torch.manual_seed(0)
    lin = nn.Linear(192, 83)
    q = cls.from_linear(lin, kernel="cpu_bf16", **kw)
    w = q.dequantize()                                                   # [83, 192] fp32
    lib = cpu_kernels.library()
    wb = torch.empty(83, 192, dtype=torch.bfloat16)                      # the C dequantiser's bf16 rows
    if cls is Int4Linear:
        lib.int4_dequant(q.qweight.data_ptr(), q.scales.data_ptr(), q.zeros.data_ptr(), 192, 64, 0, 83,
                         wb.data_ptr(), 1, 1)
    else:
        lib.int8_dequant(q.qweight.data_ptr(), q.scale.data_ptr(), 192, 0, 83, wb.data_ptr(), 1, 1)
    assert torch.equal(wb, w.bfloat16())                                 # round to nearest even, like torch
    x = torch.randn(40, 192)                                             # prefill-sized: the bf16 GEMM
    got = q(x)
    assert got.dtype == torch.float32
    assert rel(got, F.linear(x.bfloat16(), wb).float() + lin.bias) < 3e-3   # torch's bf16 GEMM (1-ulp ties)
    assert 1e-4 < rel(got, F.linear(x, w, lin.bias)) < 1e-2              # bf16 inputs and outputs
    x4 = torch.randn(4, 192)                                             # decode-sized: the fp32 kernel
    assert rel(q(x4), F.linear(x4, w, lin.bias)) < 1e-5


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(cpu_kernels.library() is None or not _cpu_has("avx512_vnni"),
                    reason="needs the C kernels on a CPU with AVX-512 VNNI")
@pytest.mark.parametrize("group,symmetric", [(32, False), (64, False), (128, True)])
def test_lowp_kernel_decodes_on_int8_rounded_activations(group, symmetric):
    assert cpu_kernels.q8_gemv() is not None        # this CPU has VNNI: the kernel must be built
    torch.manual_seed(1)
    lin = nn.Linear(256, 77)
    q = Int4Linear.from_linear(lin, group_size=group, symmetric=symmetric, kernel="cpu_lowp")
    w = q.dequantize()
    x = torch.randn(1, 256)
    xg = x.view(-1, group)                                               # x rounded to int8 per weight group
    amax = xg.abs().amax(1, keepdim=True)
    x8 = (torch.round(xg * 127 / amax) * (amax / 127)).view(1, -1)
    got = q(x)
    assert rel(got, F.linear(x8, w, lin.bias)) < 1e-5                    # integer dots == that rounding, exactly
    assert 1e-4 < rel(got, F.linear(x, w, lin.bias)) < 2e-2              # and not the fp32 result
    x4 = torch.randn(4, 256)                                             # more rows: the fp32 kernel
    assert rel(q(x4), F.linear(x4, w, lin.bias)) < 1e-5
    torch.testing.assert_close(q(torch.zeros(1, 256)), lin.bias[None].detach())   # all-zero input: the bias


def test_fallback_without_c_compiler(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_LIB", [None])
    q = Int4Linear.from_linear(nn.Linear(64, 600), group_size=32)
    x = torch.randn(3, 64)
    assert rel(q(x), F.linear(x, q.dequantize(), q.bias)) < 1e-5


def test_bench_candidates_agree():
    w = torch.randn(48, 128) * 0.05
    p, s, z = packing.quantize_int4(w, 64, False)
    ref_w = packing.dequantize_int4(p, s, z, 64)
    x = torch.randn(2, 128)
    for path in ("dequant", "torch_int4pack", "cpu_fused", "cpu_tiled", "ort"):
        fn = kernels.make_int4(path, p, s, z, 64, "cpu")
        if fn is not None:
            assert rel(fn(x), x @ ref_w.T) < 1e-4, path


# -- streaming replacement, shapes ---------------------------------------------------------
def test_w4_replaces_layer_by_layer_and_frees_each_fp32_weight(monkeypatch):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)])
    refs = [weakref.ref(m.weight) for m in model]
    alive_at_call = []
    orig = Int4Linear.from_linear.__func__

    def spy(cls, linear, *a, **k):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in refs))
        return orig(cls, linear, *a, **k)

    monkeypatch.setattr(Int4Linear, "from_linear", classmethod(spy))
    W4(["all"], 64).apply(model)
    gc.collect()
    assert alive_at_call == [5, 4, 3, 2, 1]          # the quantised layer i never coexists with fp32 i-1
    assert all(r() is None for r in refs)
    assert all(isinstance(m, Int4Linear) for m in model)


def test_unsupported_width_is_a_clear_error_and_nothing_is_quantised():
    model = nn.ModuleDict({"a": nn.Linear(64, 32), "b": nn.Linear(100, 32)})
    with pytest.raises(ValueError, match=r"group_size=64.*b \(in_features=100\)"):
        W4(["all"], 64).apply(model)
    assert all(type(m) is nn.Linear for m in model.values())
    W4(["all"], 64, on_bad_shape="skip").apply(model)
    assert isinstance(model["a"], Int4Linear) and type(model["b"]) is nn.Linear
    model = nn.ModuleDict({"b": nn.Linear(96, 32)})
    q = W4(["all"], 64, on_bad_shape="smaller_group")
    q.apply(model)
    assert model["b"].group_size == 32 and q.report["all"]["regrouped"] == {"b": 32}
    with pytest.raises(ValueError, match="not divisible"):
        Int4Linear(100, 8, group_size=32)


def test_tied_embedding_shares_the_int4_buffers_and_is_saved_once(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 96, (2, 7))
    ref = model(ids)
    q = W4(["all"], 32, embedding_bits=4)
    q.apply(model)
    assert isinstance(model.embed, QuantEmbedding) and model.embed.tied and model.embed.bits == 4
    assert model.embed.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    assert model.embed.weight.dtype == torch.float32 and model.embed.weight.numel() == 0
    out = model(ids)
    assert rel(out, ref) < 0.2
    info = q.save(model, tmp_path)
    assert info["llm"]["aliases"] == 3                 # qweight, scales, zeros stored once
    with torch.device("meta"):
        fresh = TinyLM()
    W4(["all"], 32, embedding_bits=4).load(fresh, tmp_path)
    assert torch.equal(fresh(ids), out)
    assert fresh.embed.qweight.data_ptr() == fresh.lm_head.qweight.data_ptr()


def test_w4_keeps_the_tied_head_and_embedding_in_int8_by_default():
    model = TinyLM()
    W4(["all"], 32).apply(model)
    assert isinstance(model.up, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    assert model.embed.bits == 8 and model.embed.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    float_model = TinyLM()
    W4(["all"], 32, embedding_bits=None).apply(float_model)
    assert type(float_model.lm_head) is nn.Linear and type(float_model.embed) is nn.Embedding


def test_meta_model_is_materialised_one_layer_at_a_time():
    from bluelm_v.nn.meta_build import RandomInit, materialize_remaining

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32))
    init = RandomInit(seed=3)
    W8(["all"]).apply(model, materialize=init)
    materialize_remaining(model, init)
    assert torch.equal(model[1].weight, torch.ones(64)) and not model[0].qweight.is_meta
    y = model(torch.randn(4, 64))
    assert torch.isfinite(y).all()
    twin = nn.Linear(64, 64)
    init("0", twin)                                    # same name, same seed -> same weights
    assert torch.equal(Int8Linear.from_linear(twin).qweight, model[0].qweight)


# -- checkpoints -------------------------------------------------------------------------------
def _saved(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))
    q = W4(["all"], 32)
    q.apply(model)
    q.save(model, tmp_path)
    return model, tmp_path / "all.safetensors"


def _fresh():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))


def test_checkpoint_is_standard_safetensors_with_settings(tmp_path):
    from safetensors import safe_open

    model, path = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["settings"])["group_size"] == 32
        assert torch.equal(f.get_tensor("0.qweight"), model[0].qweight)


def test_loading_with_other_settings_names_the_difference(tmp_path):
    _, _ = _saved(tmp_path)
    fresh = _fresh()
    with pytest.raises(InputError, match=r"group_size: saved 32, asked 64"):
        W4(["all"], 64).load(fresh, tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_corrupted_checkpoint_is_rejected_and_nothing_is_loaded(tmp_path, damage):
    _, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:-100]
    elif damage == "header":
        raw[8:20] = b"not json!!!!"
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    fresh = _fresh()
    with pytest.raises(InputError, match="corrupted|truncated"):
        W4(["all"], 32).load(fresh, tmp_path)
    assert all(t.is_meta for t in fresh.state_dict().values())     # nothing half-loaded


def test_checkpoint_of_another_shape_is_rejected(tmp_path):
    _saved(tmp_path)
    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    with pytest.raises(InputError, match="does not fit this model.*mismatched"):
        W4(["all"], 32).load(other, tmp_path)


# -- KV cache, activations -----------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_int8_kv_cache_chunked_matches_the_fp_cache():
    from transformers import DynamicCache

    model = _tiny_llama()
    ids = torch.randint(0, 120, (1, 40))
    outs = {}
    for name, cache in (("fp", DynamicCache(config=model.config)), ("int8", Int8KVCache(max_tokens=40))):
        logits = [model(input_ids=ids[:, s:s + 16], past_key_values=cache, use_cache=True).logits
                  for s in range(0, 40, 16)]
        outs[name] = (torch.cat(logits, 1), cache)
    assert rel(outs["int8"][0], outs["fp"][0]) < 0.01
    assert outs["int8"][1].get_seq_length() == 40
    fp_bytes = 2 * 2 * 2 * 40 * 16 * 4                 # layers * (k, v) * heads * tokens * dim * fp32
    assert outs["int8"][1].nbytes() == fp_bytes // 4 + 2 * 2 * 2 * 40 * 2


def test_static_int8_cache_roundtrip_error_per_token():
    cache = Int8StaticKVCache.allocate(2, 3, 16, 10, torch.float32, "cpu")
    k, v = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    keys, values = cache.write_read(1, torch.arange(2, 6), k, v, 6)
    assert keys.shape == (1, 3, 6, 16)
    _, scale = quantize_per_token(k)
    assert ((keys[0, :, 2:6] - k).abs() <= scale.float() / 2 + 1e-6).all()
    assert cache.nbytes == 2 * (2 * 3 * 10 * 16 + 2 * 3 * 10 * 2)


def test_a16_rounds_linear_inputs_to_16_bits_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    q = A16(["all"])
    q.apply(model)
    q.apply(model)
    assert q.report["all"]["hooked_linears"] == 0                       # second apply: already hooked
    assert len(model[0]._forward_pre_hooks) == 1
    x = torch.randn(5, 8)
    y = activation.fake_quant(x)
    assert not torch.equal(x, y) and (x - y).abs().max() <= x.abs().max() / 32767 / 2 + 1e-9
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(x)
    step = seen[0].abs().max() / 32767
    assert torch.allclose(seen[0] / step, torch.round(seen[0] / step), atol=1e-3)


# -- registry, configs, composite --------------------------------------------------------------
def test_every_quantizer_yaml_builds_through_the_registry():
    from omegaconf import OmegaConf

    from bluelm_v import plugin_manager

    _, registry, _ = plugin_manager.get()
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert names == ["a16", "bluelm_mixed", "kv8", "none", "w4", "w8"]
    for name in names:
        q = registry.create_from_config("quantizer", OmegaConf.load(CONF / f"{name}.yaml"))
        assert q.describe()["quantizer"] == name
    with pytest.raises(ConfigError, match="quantizer.group_size"):
        registry.create_from_config("quantizer", {"name": "w4", "group_size": 48}, "quantizer")


def test_bluelm_mixed_on_a_pipeline_shaped_model():
    from bluelm_v import plugin_manager

    class Pipe(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
            self.projector = nn.Sequential(nn.Linear(256, 64))
            self.llm = TinyLM()

    _, registry, _ = plugin_manager.get()
    pipe = Pipe()
    registry.quantizer.create("bluelm_mixed").apply(pipe)
    assert isinstance(pipe.encoder[2], Int8Linear) and pipe.encoder[2].act_dtype == "fp16"
    assert isinstance(pipe.projector[0], Int8Linear)
    assert isinstance(pipe.llm.up, Int4Linear) and pipe.llm.up.group_size == 64
    assert activation.activation_quant_of(pipe.llm.up) is not None
    assert activation.activation_quant_of(pipe.encoder[0]) is None
    assert kv_cache_kind(pipe) == "int8"
    sizes = weight_bytes(pipe.llm)
    int8_table = 96 * 64 + 96 * 4                               # codes + fp32 row scales (tied head)
    int4_mlp = 2 * (64 * 128 // 2 + 2 * 2 * 128)                # codes + fp16 scales/zeros per 64
    assert sizes["quantized"] == int8_table + int4_mlp
    with pytest.raises(ConfigError, match="quantizer.targets"):
        KV8(["encoder"]).apply(TinyLM())
