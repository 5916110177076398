"""Matmul paths for packed weights: ``make_int8(path, ...)`` / ``make_int4(path, ...)`` return a
callable ``x [M, K] -> y [M, N]`` (or None when the path does not exist on that device).

Paths (bench/bench_quant_kernels.py times all of them; linear.py picks per device and batch):
  dequant          dequantise the whole weight to x.dtype, then F.linear (any device)
  torch_int8pack   torch._weight_int8pack_mm (CPU; int8 weight-only)
  torch_int4pack   torch._weight_int4pack_mm_for_cpu on CPU / _weight_int4pack_mm on CUDA
                   (the weight is re-packed once into the kernel's own layout)
  compiled         torch.compile'd dequantise + matmul (inductor fuses the unpacking)
  cpu_fused        cpu_quant.int{4,8}_gemm_small: fused unpack + FMA over the packed weight (C)
  cpu_tiled        cpu_quant.int{4,8}_dequant of the whole W (<= TILE_BYTES in fp32) + one GEMM
                   (cpu_layer_ops.linear: oneDNN, else MKL), or of TILE_ROWS rows at a time + MKL
                   (the module kernels "cpu_bf16" / "cpu_lowp": the whole W in bf16, a bf16 GEMM)
  ort, ort_int8act ONNX Runtime MatMulNBits (CPU), fp32 compute / int8 activations (accuracy 4)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import packing
from . import cpu_quant

INT8_PATHS = ("dequant", "torch_int8pack", "compiled", "ort", "cpu_fused", "cpu_tiled")
INT4_PATHS = ("dequant", "torch_int4pack", "compiled", "ort", "ort_int8act", "cpu_fused", "cpu_tiled")
TILE_ROWS = 256
TILE_BYTES = 8 << 20      # W dequantised whole up to this: SmolLM2's gate|up (3072 x 576) is 7 MB

Kernel = Callable[[torch.Tensor], torch.Tensor]


# -- INT8 -------------------------------------------------------------------------------------
def _int8_dequant_linear(x, q, scale):
    return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])


def make_int8(path: str, q: torch.Tensor, scale: torch.Tensor, device: str = "cpu") -> Kernel | None:
    """q int8 [N, K], scale [N] -> a kernel, or None if ``path`` is unavailable on ``device``."""
    if path == "dequant":
        return lambda x: _int8_dequant_linear(x, q, scale)
    if path == "torch_int8pack":
        if device != "cpu":
            return None
        return lambda x: torch._weight_int8pack_mm(x, q, scale.to(x.dtype))
    if path == "compiled":
        fn = torch.compile(_int8_dequant_linear, dynamic=False)
        return lambda x: fn(x, q, scale)
    if path == "ort":
        k = q.shape[1]
        block = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
        if device != "cpu" or block is None:
            return None  # MatMulNBits takes blocks of 16..256: repeat the channel scale per block
        codes = q.to(torch.int16).add(128).to(torch.uint8)
        return _ort_matmul_nbits(codes, scale[:, None].expand(-1, k // block), None, 8, k, 0, block)
    if path in ("cpu_fused", "cpu_tiled"):
        lib = cpu_quant.library() if device == "cpu" else None
        if lib is None:
            return None
        fn = int8_fused_cpu if path == "cpu_fused" else int8_tiled_cpu
        return lambda x: fn(lib, x, q, scale)
    raise ValueError(f"unknown int8 path {path!r}; known: {', '.join(INT8_PATHS)}")


# -- INT4 -------------------------------------------------------------------------------------
def _int4_dequant_linear(x, packed, scales, zeros, group_size: int):
    return F.linear(x, packing.dequantize_int4(packed, scales, zeros, group_size, x.dtype))


def torch_int4pack_weight(packed: torch.Tensor, device: str) -> torch.Tensor:
    """Our uint8 [N, K/2] codes -> the layout of torch's int4pack kernel on ``device``."""
    codes = packing.unpack_int4(packed).to(torch.int32)                       # [N, K]
    if device == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    # CUDA (tinygemm): uint8 [N, K/2] with the EVEN column in the high nibble, then its tiling.
    swapped = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    return torch._convert_weight_to_int4pack(swapped.to(device), 8)


def make_int4(path: str, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, device: str = "cpu") -> Kernel | None:
    """packed uint8 [N, K/2], scales/zeros fp16 [N, K/g] -> a kernel, or None if unavailable."""
    if path == "dequant":
        return lambda x: _int4_dequant_linear(x, packed, scales, zeros, group_size)
    if path == "torch_int4pack":
        w = torch_int4pack_weight(packed, device)
        if device == "cpu":
            sz = packing.int4_to_torch_scales_and_zeros(scales, zeros, torch.float32)
            return lambda x: torch._weight_int4pack_mm_for_cpu(x, w, group_size, sz.to(x.dtype))
        sz = packing.int4_to_torch_scales_and_zeros(scales, zeros, torch.bfloat16)
        return lambda x: torch._weight_int4pack_mm(x.bfloat16(), w, group_size, sz).to(x.dtype)
    if path == "compiled":
        fn = torch.compile(_int4_dequant_linear, dynamic=False)
        return lambda x: fn(x, packed, scales, zeros, group_size)
    if path in ("ort", "ort_int8act"):
        if device != "cpu":
            return None
        return _ort_matmul_nbits(packed, scales, zeros, 4, packed.shape[1] * 2,
                                 4 if path == "ort_int8act" else 0, group_size)
    if path in ("cpu_fused", "cpu_tiled"):
        lib = cpu_quant.library() if device == "cpu" else None
        if lib is None:
            return None
        fn = int4_fused_cpu if path == "cpu_fused" else int4_tiled_cpu
        return lambda x: fn(lib, x, packed, scales, zeros, group_size)
    raise ValueError(f"unknown int4 path {path!r}; known: {', '.join(INT4_PATHS)}")


# -- ONNX Runtime MatMulNBits ------------------------------------------------------------------
def _ort_matmul_nbits(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      k: int, accuracy_level: int, block_size: int | None = None) -> Kernel:
    """One-node ONNX graph y = x @ dequant(W).T with W stored as ``bits``-bit codes (uint8 [N, K*bits/8],
    codes unsigned with the 2**(bits-1) midpoint default), per-block fp scales [N, K/block]."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = codes.shape[0]
    block = block_size or k
    blocks = k // block
    b = codes.cpu().numpy().reshape(n, blocks, block * bits // 8)
    s = scales.float().cpu().numpy().reshape(n, blocks)
    inputs = ["A", "B", "scales"]
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s.astype(np.float32), "scales")]
    if zeros is not None:  # ORT computes (q - zp) * scale: a float zero z (w = q*s + z) is zp = -z/s
        zp = (-zeros.float() / scales.float()).cpu().numpy().reshape(n, blocks).astype(np.float32)
        inputs.append("zero_points")
        inits.append(numpy_helper.from_array(zp, "zero_points"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # share the cores with torch
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del onnx

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"A": x.detach().float().contiguous().numpy()})[0])
    return run


# -- the C kernels (cpu_quant.py) ------------------------------------------------------------
def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def int4_fused_cpu(lib, x, packed, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """x [M, K] -> [M, N], fused unpack + FMA, MAX_SMALL_M rows of x per pass over the weight."""
    x = x.detach().float().contiguous()
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    step = cpu_quant.MAX_SMALL_M
    for r in range(0, m, step):
        rows = min(step, m - r)
        lib.int4_gemm_small(x[r].data_ptr(), rows, k, packed.data_ptr(), scales.data_ptr(), _ptr(zeros),
                            _ptr(bias), n, group_size, y[r].data_ptr(), torch.get_num_threads())
    return y


def int8_fused_cpu(lib, x, q, scale, bias=None) -> torch.Tensor:
    x = x.detach().float().contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    lib.int8_gemm_small(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), _ptr(bias), n, y.data_ptr(),
                        torch.get_num_threads())
    return y


def _tiled(dequant_rows, x, n: int, bias, bf16: bool = False) -> torch.Tensor:
    """y = x @ W.T. A W of at most TILE_BYTES in fp32 is dequantised whole and multiplied in one
    GEMM (cpu_layer_ops.linear: oneDNN, else MKL; bf16: W dequantised straight to bf16 and x
    rounded to bf16 for oneDNN's bf16 GEMM: fp32 accumulation, the result rounded to bf16 and
    returned as fp32); a larger one TILE_ROWS output rows at a time into one reused fp32 buffer,
    so no full fp32 copy of it ever exists (a 122753 x 2304 lm_head would be 1.1 GB; the memory
    job's 2.2 GB budget has no room for bigger tiles)."""
    x = x.float()
    m, k = x.shape
    if n * k * 4 <= TILE_BYTES:
        from bluelm_v.nn.kernels.cpu_layer_ops import linear

        buf = torch.empty((n, k), dtype=torch.bfloat16 if bf16 else torch.float32)     # [N, K]
        dequant_rows(0, n, buf)
        y = linear(x.to(buf.dtype).contiguous(), buf).float()                           # [M, N]
        return y if bias is None else y.add_(bias)
    y = torch.empty((m, n), dtype=torch.float32)                              # [M, N]
    buf = torch.empty((min(TILE_ROWS, n), k), dtype=torch.float32)            # [T, K]
    part = torch.empty((m, min(TILE_ROWS, n)), dtype=torch.float32)           # [M, T]
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(n, r0 + TILE_ROWS)
        dequant_rows(r0, r1, buf)
        if r1 - r0 == part.shape[1]:
            torch.mm(x, buf.t(), out=part)
            y[:, r0:r1].copy_(part)
        else:
            y[:, r0:r1] = x @ buf[: r1 - r0].t()
    return y if bias is None else y.add_(bias)


def int4_tiled_cpu(lib, x, packed, scales, zeros, group_size: int, bias=None, bf16=False) -> torch.Tensor:
    k = packed.shape[1] * 2
    threads = torch.get_num_threads()
    return _tiled(lambda r0, r1, buf: lib.int4_dequant(packed.data_ptr(), scales.data_ptr(), _ptr(zeros), k,
                                                       group_size, r0, r1, buf.data_ptr(), threads,
                                                       int(buf.dtype == torch.bfloat16)),
                  x, packed.shape[0], bias, bf16)


def int8_tiled_cpu(lib, x, q, scale, bias=None, bf16=False) -> torch.Tensor:
    k = q.shape[1]
    threads = torch.get_num_threads()
    return _tiled(lambda r0, r1, buf: lib.int8_dequant(q.data_ptr(), scale.data_ptr(), k, r0, r1, buf.data_ptr(),
                                                       threads, int(buf.dtype == torch.bfloat16)),
                  x, q.shape[0], bias, bf16)
