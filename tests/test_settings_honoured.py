"""No quantizer setting silently ignored: every engine and the ONNX Runtime backend either
applies the a16 / kv8 / w4 settings a model carries (its outputs match the model's own forward
with the same setting, and differ from the model without it) or refuses them with one line
naming the setting and the engine."""
from __future__ import annotations

import pytest
import torch

from bluelm_v import plugin_manager
from bluelm_v.errors import ConfigError

REGISTRY = plugin_manager.get()[1]
# 4-bit activations (a difference no numerical noise explains), one scale per row (the result
# does not depend on how the prompt is chunked, so one unchunked forward is the reference); the
# head is left out so the difference comes from the decoder layers, where engines read weights
A16 = {"name": "a16", "bits": 4, "granularity": "token", "skip": ["*lm_head"]}


def tiny_llm(dtype: str, settings=(), device: str = "cpu"):
    """The tiny Llama with weights large enough (std 0.1) that its layers shape the logits."""
    llm = REGISTRY.llm.create("hf_causal", preset="tiny", dtype=dtype, seed=3, config={"initializer_range": 0.1},
                              device=device)
    for node in settings:
        REGISTRY.create_from_config("quantizer", node, "quantizer").apply(llm)
    return llm


def own_forward(llm, embeds, kv8: bool) -> torch.Tensor:
    """[V] last logits of the model's own transformers forward (hooks run; INT8 cache if kv8)."""
    cache = None
    if kv8:
        from bluelm_v.nn.kv_cache_hf import Int8KVCache
        cache = Int8KVCache(max_tokens=embeds.shape[1])
    with torch.no_grad():
        return llm.model(inputs_embeds=embeds, past_key_values=cache, use_cache=kv8).logits[0, -1].float()


def count_calls(model) -> dict:
    """name -> calls, for every module carrying an a16 rounding hook (counted from now on)."""
    from bluelm_v.nn.activation_quant import activation_quant_of

    calls: dict = {}
    for name, m in model.named_modules():
        if activation_quant_of(m) is not None:
            calls[name] = 0
            m.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("engine, dtype, options, settings", [
    ("hf", "float32", {}, [A16, {"name": "kv8"}]),
    ("hf", "bfloat16", {}, [A16]),
    ("fast", "float32", {}, [A16, {"name": "kv8"}]),                     # INT8 cache: module path
    ("fast", "float32", {}, [A16]),                                      # the C-helper CPU path
    ("fast", "float32", {"attention": "matmul"}, [A16]),                 # module path, fused q|k|v
    ("fast", "bfloat16", {}, [A16]),                                     # raw-weight layer path
    ("fast", "float32", {}, [{"name": "w4", "group_size": 32}, A16]),    # INT4 layers + hooks
    ("auto", "bfloat16", {}, [A16, {"name": "kv8"}]),
], ids=["hf-a16-kv8", "hf-bf16-a16", "fast-a16-kv8", "fast-cpu-a16", "fast-matmul-a16", "fast-bf16-a16",
        "fast-w4-a16", "auto-bf16-a16-kv8"])
def test_engine_applies_the_settings_the_model_carries(engine, dtype, options, settings):
    kv8 = any(s["name"] == "kv8" for s in settings)
    plain = tiny_llm(dtype, [s for s in settings if s["name"] == "w4"])
    llm = tiny_llm(dtype, settings)
    gen = torch.Generator().manual_seed(0)
    embeds = (torch.randn(1, 11, llm.hidden_size, generator=gen) * 0.5).to(plain.model.dtype)   # [1,L,D]
    without, wanted = own_forward(plain, embeds, False), own_forward(llm, embeds, kv8)
    eng = REGISTRY.create_from_config("engine", {"name": engine, **options}, "engine", model=llm.model)
    calls = count_calls(llm.model)
    eng.begin(16)
    got = eng.prefill(embeds, 5)                                          # chunks 5 + 5 + 1
    assert len(calls) == 2 * 7 and all(n >= 3 for n in calls.values()), calls   # every hooked layer ran
    effect = float((wanted - without).abs().max())
    assert effect > 0.2, effect                                           # the settings change the logits
    if dtype == "float32":                                                # ... and the engine applied them
        assert float((got - wanted).abs().max()) < 1e-3 * effect
    if kv8:
        assert "Int8" in type(eng.cache).__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CUDA-graph decode step)")
def test_fast_engine_on_cuda_rounds_activations_in_prefill_and_in_the_graph_step():
    llm = tiny_llm("float32", [A16], device="cuda")
    embeds = torch.randn(1, 11, llm.hidden_size, generator=torch.Generator().manual_seed(0)).cuda() * 0.5
    wanted = own_forward(llm, embeds, False)
    graph = REGISTRY.engine.create("fast", model=llm.model, cuda_graph=True)
    calls = count_calls(llm.model)
    graph.begin(32)
    got = graph.prefill(embeds, 5)
    assert all(n >= 3 for n in calls.values()) and float((got - wanted).abs().max()) < 1e-3
    tokens = graph.steps(int(got.argmax()), 6)                            # replays of the captured step
    eager = REGISTRY.engine.create("fast", model=llm.model, cuda_graph=False)
    eager.begin(32)
    eager.prefill(embeds, 5)
    assert tokens == eager.steps(int(got.argmax()), 6)                    # hooks run in every eager step


@pytest.mark.parametrize("setting, shown", [(A16, "a16"), ({"name": "kv8"}, "kv8")])   # w4/w8: its INT4 step
def test_triton_engine_refuses_a_quantised_model_naming_the_setting(setting, shown):
    from bluelm_v.plugins.engines import triton_engine

    assert REGISTRY.engine.entry("triton").factory is triton_engine
    llm = tiny_llm("float32", [setting])
    with pytest.raises(ConfigError) as err:
        triton_engine(llm.model, tune=False)
    msg = str(err.value)
    assert msg.startswith("engine=triton cannot honour quantizer setting(s) ") and f" {shown} (" in msg
    assert "engine=fast" in msg and "\n" not in msg


# -- ONNX Runtime ------------------------------------------------------------------------------
TINY_CFG = {"tiler": {"name": "relaxed", "max_grid": 2}, "encoder": {"name": "siglip", "preset": "tiny"},
            "downsampler": {"name": "vila_2x2"}, "projector": {"name": "mlp2x_gelu"},
            "llm": {"name": "hf_causal", "preset": "tiny"}, "plugins": {}}
CASE = {"image": [384, 384], "tiles_per_batch": 2, "prefill_chunk": 64, "prompt_tokens": 450,
        "decode_tokens": 3, "quantizer": None}


def op_counts(path) -> dict:
    import onnx

    counts: dict = {}
    for node in onnx.load(str(path)).graph.node:
        key = node.op_type
        if key == "Cast":
            key = f"Cast:{onnx.TensorProto.DataType.Name(node.attribute[0].i)}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_onnxruntime_refuses_a16_and_kv8_and_runs_the_rest(tmp_path):
    """Its graphs keep fp32 activations and an fp32 KV buffer: a16 and kv8 (alone or inside a
    composite such as bluelm_mixed) fail the case with one line naming the setting and the backend,
    instead of being measured as if they applied."""
    from bluelm_v.errors import ConfigError
    from bluelm_v.plugins.backends.onnx_runtime import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(export_dir=str(tmp_path))
    b.load(TINY_CFG, REGISTRY)
    assert b.run_case(CASE)["check_ok"]
    for node, setting in (({"name": "a16"}, "a16"), ({"name": "kv8"}, "kv8"), ({"name": "bluelm_mixed"}, "a16")):
        with pytest.raises(ConfigError, match=f"backend onnxruntime cannot run quantizer setting {setting}") as err:
            b.run_case({**CASE, "quantizer": node})
        assert "\n" not in str(err.value)
    assert b.run_case({**CASE, "quantizer": {"name": "w8"}})["check_ok"]
