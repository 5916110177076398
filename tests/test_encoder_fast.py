"""The siglip encoder's fast path (bluelm_v/nn/siglip_fast.py): fused q|k|v layer function,
FP8 matmuls, attention backends, and its weights after quantisation, reloading and release.
torch.compile and CUDA graphs run on the GPU (bench/bench_gpu_infer.py, and the CUDA test here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bluelm_v.plugins import encoders


def _pair(implementation="transformers", **fast):
    torch.manual_seed(0)
    ref = encoders.siglip(preset="tiny", implementation=implementation).eval()
    enc = encoders.siglip(preset="tiny", implementation=implementation, **fast).eval()
    enc.load_state_dict(ref.state_dict())
    return ref, enc


@pytest.mark.parametrize("implementation", ["transformers", "native"])
def test_fused_layer_function_gives_the_module_features(implementation):
    ref, enc = _pair(implementation, fused=True, attention="math")
    x = torch.randn(3, 3, 384, 384)
    with torch.no_grad():
        want, got = ref(x), enc(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer = enc.layers[0]
    assert layer.self_attn.q_proj.weight.data_ptr() == layer.fast_qkv_weight.data_ptr()   # views: no copy
    assert set(enc.state_dict()) == set(ref.state_dict())            # nothing new is saved


def test_fp8_matmuls_are_close_but_really_quantised_and_follow_new_weights():
    ref, enc = _pair(fp8=True)
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        want, got = ref(x), enc(x)
    cos = F.cosine_similarity(got.flatten(1), want.flatten(1))
    assert cos.min() > 0.999 and (got - want).abs().max() > 1e-5
    assert enc.layers[0].fast_fp8_fc1.dtype == torch.float8_e4m3fn
    other = encoders.siglip(preset="tiny", seed=7).eval()
    enc.load_state_dict(other.state_dict())                         # after the FP8 copies were made
    with torch.no_grad():
        assert F.cosine_similarity(enc(x).flatten(1), other(x).flatten(1)).min() > 0.999


def test_quantised_layers_run_their_modules_and_drop_the_fused_weights():
    from bluelm_v.plugins.quantizers.schemes import W8

    ref, enc = _pair(fused=True)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        enc(x)                                                       # fused buffers made
        for model in (ref, enc):
            W8(["all"]).apply(torch.nn.ModuleDict({"encoder": model}))
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
    assert not any(n.startswith("fast_") for layer in enc.layers for n in layer._buffers)


def test_released_encoder_keeps_no_fast_weights():
    from bluelm_v.model import BlueLMV
    from bluelm_v.plugin_manager import get
    from bluelm_v.runtime import Generator

    cfg = {"encoder": {"name": "siglip", "preset": "tiny", "fp8": True}, "downsampler": {"name": "vila_2x2"},
           "projector": {"name": "mlp2x_gelu"}, "llm": {"name": "hf_causal", "preset": "tiny"}}
    model = BlueLMV.from_config(cfg, get()[1])
    gen = Generator(model, release_encoder=True)
    gen.generate("<image>", [torch.randn(1, 3, 384, 384)], max_new_tokens=1)
    assert gen.encoder_released
    assert sum(t.numel() for t in model.encoder.buffers()) + sum(p.numel() for p in model.encoder.parameters()) == 0


def test_unknown_attention_backend_is_refused_by_the_registry():
    from bluelm_v.errors import ConfigError
    from bluelm_v.plugin_manager import get

    with pytest.raises(ConfigError, match="attention"):
        get()[1].create_from_config("encoder", {"name": "siglip", "attention": "fastest"}, "encoder")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and compile need a CUDA device")
def test_graphed_and_compiled_encoder_match_eager_on_cuda():
    torch.manual_seed(0)
    ref = encoders.siglip(preset="tiny", device="cuda", dtype="bfloat16").eval()
    enc = encoders.siglip(preset="tiny", device="cuda", dtype="bfloat16", compile=True, cuda_graph=True).eval()
    enc.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for k in (3, 9, 3):
            x = torch.randn(k, 3, 384, 384, device="cuda")
            torch.testing.assert_close(enc(x, tiles_per_batch=4), ref(x), rtol=3e-2, atol=3e-2)
