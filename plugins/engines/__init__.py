"""LLM engines (family ``engine``): how the runtime runs the LLM's prefill and decode steps.

    engine: {name: auto}                                  # fast for Llama-family models, else hf
    engine: {name: fast, cuda_graph: true, compile: false}
    engine: {name: triton}                                # CUDA + Triton only

    eng = registry.create_from_config("engine", cfg.engine, "engine", model=causal_lm)
    eng.begin(max_len)                                    # allocate the KV cache (reused when it fits)
    logits = eng.prefill(embeds [1,L,D], chunk=128)       # -> [V] logits of the last position
    nxt = eng.step(token_id)                              # one greedy decode step (t1)
    toks = eng.steps(token_id, n)                         # n steps (CUDA graphs: queued, read once)
    eng.decode_chunk, eng.length, eng.cache, eng.device, eng.name, eng.cache_bytes
    eng.begin_batch(rows, max_len); eng.prefill_batch(embeds, chunk); eng.steps_batch(rows, tokens, n)
                                                          # batches of sequences (batch_api.py)

Engines (the modules beside this one; torch is imported only when one is created):
  hf      the model's own forward with a DynamicCache (any transformers causal LM)
  fast    FastLlamaEngine: static KV cache, fused projections, CUDA graph per decode step, the
          C-helper CPU path (fast_cpu.py) for fp32 on CPU
  triton  TritonDecodeEngine: the fast engine with the decode step as Triton kernels (CUDA)
  auto    fast where the model is Llama-family and supported, else hf

Quantizer settings: hf, fast and auto honour every one the model carries (w4/w8 layers run as
modules, a16 activation rounding hooks run, kv8 gives an INT8 cache). triton runs plain, w4 and
w8 weights (its quantised GEMVs unpack them: triton_quant.py); a16 and kv8 (or any model its
kernels cannot take) are refused with one line naming the setting, never run silently on another
step.
"""
from __future__ import annotations

from bluelm_v import hookimpl

# Factories are named *_engine: a function named like a module beside it (hf.py, fast.py) would
# be replaced by that module as a package attribute once the module is imported.

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION = ("sdpa", "matmul")


def hf_engine(model):
    """Any transformers causal LM: its own forward with a DynamicCache, chunk by chunk."""
    from .hf import HFEngine

    return HFEngine(model)


def fast_engine(model, fuse: bool = True, cuda_graph: bool = True, compile: bool = False,
         attention: str = "sdpa", cpu_half_kv: bool = True):
    """Lean Llama-family forward: static KV cache, fused q|k|v and gate|up, CUDA-graph decode step,
    C helpers on CPU (``cpu_half_kv``: decode attention over an fp16 mirror of the cache)."""
    from .fast import FastLlamaEngine

    if not FastLlamaEngine.supports(model):
        from bluelm_v.errors import ConfigError
        raise ConfigError(f"engine=fast: the LLM ({type(model).__name__}, model_type "
                          f"{getattr(model.config, 'model_type', '?')!r}) is not a Llama-family decoder "
                          f"the fast engine can run; use engine=hf or engine=auto")
    return FastLlamaEngine(model, fuse=fuse, cuda_graph=cuda_graph, compile=compile,
                           attention=attention, cpu_half_kv=cpu_half_kv)


def auto_engine(model, fuse: bool = True, cuda_graph: bool = True, compile: bool = False,
         attention: str = "sdpa", cpu_half_kv: bool = True):
    """``fast`` for Llama-family models it supports, else ``hf``."""
    from .fast import FastLlamaEngine

    if getattr(model.config, "model_type", "") in FAST_MODEL_TYPES and FastLlamaEngine.supports(model):
        return FastLlamaEngine(model, fuse=fuse, cuda_graph=cuda_graph, compile=compile,
                               attention=attention, cpu_half_kv=cpu_half_kv)
    return hf_engine(model)


def triton_unavailable() -> str | None:
    """Why the Triton engine cannot run on this machine (None when it can)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def triton_engine(model, tune: bool = True, tune_budget_s: float = 150.0, pdl: bool = True,
           prefetch: bool = True, configs: dict | None = None, fuse: bool = True):
    """The fast engine with its decode step as one CUDA graph of Triton kernels (5-6 a layer),
    block shapes tuned per call site at the first decode (``tune``)."""
    from bluelm_v.errors import ConfigError
    from bluelm_v.plugins.quantizers.schemes import applied_settings, describe_settings

    from .triton_step import TritonDecodeEngine

    refused = {k: v for k, v in applied_settings(model).items() if k not in ("w4", "w8")}
    if refused:
        raise ConfigError(f"engine=triton cannot honour quantizer setting(s) {describe_settings(refused)}: "
                          "its Triton decode step runs plain, w4 or w8 weights and an fp KV cache only; use "
                          "engine=fast (or auto) with this quantizer, or quantizer=none with engine=triton")
    engine = TritonDecodeEngine(model, configs=configs, tune=tune, tune_budget_s=tune_budget_s,
                                pdl=pdl, prefetch=prefetch, fuse=fuse)
    if not engine.triton_ok:
        raise ConfigError(f"engine=triton cannot run this LLM ({type(model).__name__}, {engine.dtype}, head_dim "
                          f"{engine.head_dim}) as Triton kernels: they need bias-free Llama layers (plain, or w4/w8 "
                          "with fp32 activations), fp32/bf16/fp16 and a power-of-two head_dim; use engine=fast")
    return engine


def make_engine(model, kind: str = "auto", **options):
    """An engine by registered name through the plugin registry (for scripts and tests; jobs
    create theirs from the ``engine`` config node)."""
    from bluelm_v import plugin_manager

    registry = plugin_manager.get()[1]
    return registry.create_from_config("engine", {"name": kind, **options}, "engine", model=model)


@hookimpl
def bluelm_v_register(registry):
    fast_choices = {"attention": ATTENTION}
    registry.engine.register("auto", auto_engine, choices=fast_choices)
    registry.engine.register("hf", hf_engine)
    registry.engine.register("fast", fast_engine, choices=fast_choices)
    registry.engine.register("triton", triton_engine, ranges={"tune_budget_s": (0, None)},
                             requires=triton_unavailable)
