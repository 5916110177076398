"""Quantisation building blocks behind plugins/quantizers.py (torch is imported inside).

    packing     INT8 per-channel and group-wise INT4 quantise / pack / dequantise (pure torch)
    cpu_kernels hand-written C kernels (fused INT4/INT8 matvec, row dequantisation), built once
    kernels     every matmul path for packed weights (the benchmark's candidates + the chosen ones)
    linear      Int8Linear, Int4Linear, QuantEmbedding: drop-in nn.Linear / nn.Embedding
    replace     streaming in-place replacement of layers (one fp32 layer alive at a time)
    activation  INT16 activation fake-quantisation (a16)
    kv_cache    INT8 KV cache, per-token per-head scales (transformers Cache + static runtime cache)
    io          safetensors save/load with a settings header and checks (nothing half-loaded)
    schemes     the quantizers: none, w8, w4, a16, kv8 and composites (bluelm_mixed)
    streaming   meta-device build + per-layer init (full-size models without an fp32 copy)
    evaluate    perplexity, decode speed, feature cosine, offline text and images
"""
