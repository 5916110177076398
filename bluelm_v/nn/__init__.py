"""Torch building blocks that several plugins and jobs share (imported only where torch is).

    llama           a transformers-free Llama causal LM (transformers' names and maths)
    siglip          transformers-free SigLIP vision layers
    kv_cache        the runtime's static KV caches (model dtype, INT8) and the INT8 codec
    kv_cache_hf     the INT8 KV cache as a transformers Cache (for the hf engine)
    packing         INT8 / group-wise INT4 quantise, pack and dequantise (pure torch)
    quant_linear    Int8Linear, Int4Linear, quantised embeddings: drop-in nn.Linear / nn.Embedding
    quant_replace   streaming in-place replacement of layers (one fp32 layer alive at a time)
    activation_quant  INT16 activation fake-quantisation hooks (the ``a16`` quantizer)
    quant_io        safetensors save/load of quantised parts with a settings header and checks
    meta_build      meta-device model build + per-layer init (full-size models, no fp32 copy)
    kernels/        C kernels for CPU (built once, loaded with ctypes) and Triton kernels for CUDA

Layering (import-linter, pyproject.toml): bluelm_v.nn imports the core and torch, never
bluelm_v.plugins or bluelm_v.jobs.
"""
