"""Kernels the engines and quantised layers call.

    cpu_quant       C kernels for packed weights (fused INT4/INT8 GEMV, row dequantisation) and the
                    one build-and-load helper for every C library here (cc, cached per CPU)
    cpu_layer_ops   C helpers of the fast engine's CPU layer (RMSNorm, RoPE + cache write, SiLU,
                    decode attention) and the oneDNN/MKL GEMM used for prefill
    quant_matmul    every matmul path for packed weights (what quant_linear picks per device)
    triton_decode   Triton kernels of the CUDA decode step (None where triton is not installed)
"""
