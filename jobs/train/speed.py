"""Speed options of the training step, shared by the train job (``bluelm_v.jobs.train.loop``) and
``bench/bench_train_gpu.py``: config keys ``train.compile``, ``train.compile_mode``,
``train.loss_chunk_tokens``, ``train.sdpa_backend``, ``train.fused_projections``,
``train.attention``, ``train.activation_checkpointing``, ``train.encoder_tiles_per_batch``
(+ ``packing`` / ``max_seq``).

    net = apply_speed_options(model, {"compile": True, "loss_chunk_tokens": 2048, ...})   # a TrainStep
    set_sdpa_backend("flash")                  # CUDA: only this attention kernel may run (else an error)
    compile_blocks(model, mode="default")      # torch.compile each LLM decoder layer and ViT layer

The module DeepSpeed wraps (TrainStep) is in jobs/train/step.py, the chunked loss in
jobs/train/loss.py.
"""
from __future__ import annotations

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def set_sdpa_backend(name: str | None) -> None:
    """Restrict torch's scaled_dot_product_attention on CUDA to one kernel family (process-wide;
    an input that kernel cannot take then raises instead of silently using another). ``auto`` /
    None leaves torch's choice. No effect on CPU."""
    import torch

    name = name or "auto"
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend {name!r}: use one of {SDPA_BACKENDS}")
    if name == "auto" or not torch.cuda.is_available():
        return
    b = torch.backends.cuda
    b.enable_flash_sdp(name == "flash")
    b.enable_cudnn_sdp(name == "cudnn")
    b.enable_mem_efficient_sdp(name == "efficient")
    b.enable_math_sdp(name == "math")


def compile_blocks(model, mode: str | None = "default", llm: bool = True) -> int:
    """Regional torch.compile: every LLM decoder layer and encoder layer (layers of one kind share
    one graph; norms, rotary, activations and residual adds fuse into a few Triton kernels).
    The first shape compiles static; a second one (another sequence length or crop count, as in
    LLaVA data) recompiles once with those sizes dynamic (torch's automatic dynamic shapes), so
    varying batches do not recompile every step. ``llm=False``: the encoder's layers only (the
    training decoder compiles its own layer function). Returns the layer count."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    kw = {} if mode in (None, "default") else {"mode": mode}
    n = 0
    stacks = (model.llm.model.model.layers, model.encoder.layers) if llm else (model.encoder.layers,)
    for layers in stacks:
        for layer in layers:
            layer.compile(**kw)
            n += 1
    return n


def apply_speed_options(model, options: dict):
    """The job's and the bench's one entry point. ``options`` (config keys of train.*): compile,
    compile_mode, loss_chunk_tokens, sdpa_backend, fused_projections, attention, packing, max_seq,
    activation_checkpointing, encoder_tiles_per_batch. Sets the sdpa backend, compiles the encoder layers (and the LLM's:
    its own decoder layers for the reference path, jobs/train/decoder.py's layer function
    otherwise) and returns the TrainStep to hand to DeepSpeed (its ``.model`` is ``model``)."""
    from bluelm_v.jobs.train.step import train_step_module

    set_sdpa_backend(options.get("sdpa_backend"))
    compiled = bool(options.get("compile"))
    mode = options.get("compile_mode") or "default"
    step = train_step_module(model, int(options.get("loss_chunk_tokens") or 0), compiled_loss=compiled,
                             fused=bool(options.get("fused_projections")), attention=options.get("attention") or "auto",
                             max_seq=options.get("max_seq"), packing=bool(options.get("packing")),
                             compiled_layers=compiled, compile_mode=mode,
                             checkpointing=bool(options.get("activation_checkpointing")),
                             encoder_tiles=int(options.get("encoder_tiles_per_batch") or 0))
    if compiled:
        compile_blocks(model, mode, llm=not step.own_decoder)
    return step
