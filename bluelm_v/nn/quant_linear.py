"""Drop-in inference replacements for nn.Linear / nn.Embedding with packed integer weights.

    Int8Linear   per-output-channel symmetric INT8: qweight int8 [N, K], scale fp32 [N]
    Int4Linear   group-wise INT4: qweight uint8 [N, K/2] (two codes per byte), scales fp16 [N, K/g],
                 zeros fp16 [N, K/g] when asymmetric (formats: packing.py)
    Int4Embedding / Int8Embedding   row lookups that dequantise only the rows asked for; built
                 ``tied_to`` a quantised lm_head they share the same buffers (one copy in memory)

Kernel per device and batch (``kernel="auto"``; measured in bench/bench_quant_kernels.py):
  CPU, rows M <= FUSED_MAX_M (decode)  cpu_fused: C unpack+FMA over the packed weight
  CPU, larger M (prefill, encoder)     cpu_tiled: C dequantise 256 rows -> MKL GEMM, buffer reused
  CPU without a C compiler             dequant: torch dequantise (tiled) -> F.linear
  CUDA, INT4                           torch's tinygemm (_weight_int4pack_mm, bf16 activations,
                                       a re-laid-out copy of the codes), dequant if it refuses
  CUDA INT8 / other devices            dequant in the activation dtype -> F.linear
``kernel="cpu_bf16"``: as auto, but a W of <= 8 MB (fp32) is dequantised to bf16 and multiplied
by bf16-rounded activations (oneDNN's bf16 GEMM, fp32 accumulation, bf16-rounded outputs: ~2x the
fp32 rate on AVX512-BF16 / AMX, slower than fp32 on CPUs without native bf16; llama.cpp's Q4 prefill
rounds activations to 8 bits); decode stays on the fp32 fused kernel.
``kernel="cpu_lowp"``: cpu_bf16's prefill and, for INT4 layers, decode (one row) on activations rounded
to int8 per weight group with integer dot products (cpu_quant.int4_gemv_q8, AVX-512 VNNI): llama.cpp's
Q4 x Q8 scheme, ~0.5% relative error on a layer's output.
Activations are computed in fp32 on CPU; ``act_dtype="fp16"`` rounds the layer input to fp16 first,
ACT_CHUNK rows at a time
(the paper's FP16 ViT activations, simulated). Inference only: no gradients flow to the codes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import packing
from .kernels import cpu_quant, quant_matmul

FUSED_MAX_M = 16
CPU_KERNELS = ("auto", "cpu_fused", "cpu_tiled", "cpu_bf16", "cpu_lowp")     # the C kernels' module kernels
BF16_PREFILL = ("cpu_bf16", "cpu_lowp")
FUSED_DECODE = ("auto", "cpu_fused") + BF16_PREFILL    # at most FUSED_MAX_M rows: the fused C kernel
ACT_CHUNK = 1024      # rows rounded to act_dtype at a time (caps the transient copies of x)
ACT_DTYPES = ("fp32", "fp16", "bf16")
_ACT = {"fp16": torch.float16, "bf16": torch.bfloat16}


class QuantLinearBase(nn.Module):
    """Shared shape handling, bias, activation rounding and kernel dispatch."""

    bits = 0
    CUDA_AUTO: str | None = None      # the kernel "auto" tries first on CUDA

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: str = "auto",
                 act_dtype: str = "fp32", device=None):
        super().__init__()
        if act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {list(ACT_DTYPES)}, got {act_dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.kernel, self.act_dtype = kernel, act_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._device_kernels: dict = {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}, act_dtype={self.act_dtype}")

    def weight_bytes(self) -> int:
        """Bytes of the stored weight (codes + scales + zeros), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _load_from_state_dict(self, *args, **kwargs):
        self._device_kernels.clear()      # kernels built from the old tensors (e.g. tinygemm layouts)
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dtype is torch.float32 and x.device.type == "cpu" and self.act_dtype == "fp32" \
                and self.kernel in FUSED_DECODE and x.numel() <= FUSED_MAX_M * self.in_features:
            lib = cpu_quant.library()       # decode: straight to the C kernel, few Python steps
            if lib is not None and self._fused_ok:
                x2 = x.reshape(-1, self.in_features)
                y = torch.empty(shape[:-1] + (self.out_features,))
                self._fused_into(lib, x2 if x2.is_contiguous() else x2.contiguous(), y)
                return y
        x2 = x.reshape(-1, self.in_features)                                  # [M, K]
        with torch.no_grad():
            if self.act_dtype == "fp32":
                y = self._matmul(x2)                                          # [M, N]
            else:   # rounded ACT_CHUNK rows at a time: no full-size fp16 + fp32 copies of x
                y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32, device=x.device)
                for r in range(0, x2.shape[0], ACT_CHUNK):
                    xr = x2[r:r + ACT_CHUNK].to(_ACT[self.act_dtype]).to(x.dtype)
                    y[r:r + ACT_CHUNK] = self._matmul(xr)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _pointers(self, names: tuple) -> tuple:
        """Data pointers of the named buffers + bias (None where absent), cached while the very
        same tensors (same storage) stay in place: the decode path calls this ~200 times a token."""
        tensors = tuple(self._buffers.get(n) for n in names) + (self._parameters.get("bias"),)
        cache = self.__dict__.get("_ptr_cache")
        if cache is not None and all(a is b for a, b in zip(cache[0], tensors)) and cache[2] == tensors[0].data_ptr():
            return cache[1]
        ptrs = tuple(None if t is None else t.data_ptr() for t in tensors)
        self.__dict__["_ptr_cache"] = (tensors, ptrs, ptrs[0])
        return ptrs

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.kernel in CPU_KERNELS:
            lib = cpu_quant.library()
            if lib is not None:
                fused = self.kernel == "cpu_fused" or (self.kernel in FUSED_DECODE and x.shape[0] <= FUSED_MAX_M)
                return self._cpu_fused(lib, x) if fused else self._cpu_tiled(lib, x, self.kernel in BF16_PREFILL)
        if self.kernel not in ("auto", "dequant") + CPU_KERNELS:
            fn = self._device_kernels.get(x.device)
            if fn is None:
                fn = self._make_kernel(self.kernel, x.device.type)
                if fn is None:
                    raise RuntimeError(f"kernel {self.kernel!r} is not available on {x.device}")
                self._device_kernels[x.device] = fn
            y = fn(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if x.device.type == "cuda" and self.kernel == "auto" and self.CUDA_AUTO is not None:
            fn = self._device_kernels.get(x.device, "untried")
            if fn == "untried":           # torch's tinygemm where its shape rules allow, else dequant
                try:
                    fn = self._make_kernel(self.CUDA_AUTO, "cuda")
                    fn(x[:1])
                except (RuntimeError, ValueError):
                    fn = None
                self._device_kernels[x.device] = fn
            if fn is not None:
                y = fn(x)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        return self._dequant_matmul(x)

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantise ``quant_matmul.TILE_ROWS`` output rows at a time (no full fp copy of W on CPU)."""
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        x = x.to(dtype)
        if x.device.type != "cpu":
            y = F.linear(x, self.dequantize(dtype=dtype))
        else:
            step = quant_matmul.TILE_ROWS
            y = torch.cat([F.linear(x, self.dequantize(r, min(r + step, self.out_features), dtype))
                           for r in range(0, self.out_features, step)], dim=-1)
        return y if self.bias is None else y + self.bias.to(dtype)


class Int8Linear(QuantLinearBase):
    """nn.Linear with per-output-channel symmetric INT8 weights (w = scale[n] * q[n, k])."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto",
                 act_dtype: str = "fp32", device=None):
        super().__init__(in_features, out_features, bias, kernel, act_dtype, device)
        self.register_buffer("qweight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto", act_dtype: str = "fp32") -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, act_dtype,
                device="meta")
        q.qweight, q.scale = packing.quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        return q

    def dequantize(self, r0: int = 0, r1: int | None = None, dtype=torch.float32) -> torch.Tensor:
        return packing.dequantize_int8(self.qweight[r0:r1], self.scale[r0:r1], dtype)

    _fused_ok = True

    def _fused_into(self, lib, x, y):
        q, s, b = self._pointers(("qweight", "scale"))
        lib.int8_gemm_small(x.data_ptr(), x.shape[0], self.in_features, q, s, b, self.out_features, y.data_ptr(),
                            torch.get_num_threads())

    def _cpu_fused(self, lib, x):
        return quant_matmul.int8_fused_cpu(lib, x, self.qweight, self.scale, self.bias)

    def _cpu_tiled(self, lib, x, bf16=False):
        return quant_matmul.int8_tiled_cpu(lib, x, self.qweight, self.scale, self.bias, bf16)

    def _make_kernel(self, path, device):
        return quant_matmul.make_int8(path, self.qweight, self.scale, device)


class Int4Linear(QuantLinearBase):
    """nn.Linear with group-wise INT4 weights packed two per byte (see packing.py for the formula)."""

    bits = 4
    CUDA_AUTO = "torch_int4pack"      # H200: 0.045 ms vs 0.225 ms dequant at batch 1 (bench)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64,
                 symmetric: bool = False, kernel: str = "auto", act_dtype: str = "fp32", device=None):
        packing.check_int4_shape(in_features, group_size, f"Linear({in_features}, {out_features})")
        super().__init__(in_features, out_features, bias, kernel, act_dtype, device)
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones((out_features, groups), dtype=packing.SCALE_DTYPE, device=device))
        if symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros((out_features, groups), dtype=packing.SCALE_DTYPE, device=device))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, symmetric={self.symmetric}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, symmetric: bool = False,
                    kernel: str = "auto", act_dtype: str = "fp32", refine: int = 0) -> "Int4Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, symmetric,
                kernel, act_dtype, device="meta")
        q.qweight, q.scales, zeros = packing.quantize_int4(linear.weight.detach(), group_size, symmetric,
                                                           refine=refine)
        if zeros is not None:
            q.zeros = zeros
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        return q

    def dequantize(self, r0: int = 0, r1: int | None = None, dtype=torch.float32) -> torch.Tensor:
        zeros = None if self.zeros is None else self.zeros[r0:r1]
        return packing.dequantize_int4(self.qweight[r0:r1], self.scales[r0:r1], zeros, self.group_size, dtype)

    @property
    def _fused_ok(self) -> bool:
        return self.group_size <= cpu_quant.MAX_GROUP

    def _q8(self, rows: int):
        """The int8-activation GEMV for a one-row input with kernel cpu_lowp (where built), else None."""
        return cpu_quant.q8_gemv() if self.kernel == "cpu_lowp" and rows == 1 else None

    def _fused_into(self, lib, x, y):
        q, s, z, b = self._pointers(("qweight", "scales", "zeros"))
        q8 = self._q8(x.shape[0])
        if q8 is not None:
            return q8(x.data_ptr(), self.in_features, q, s, z, b, self.out_features, self.group_size, y.data_ptr(),
                      torch.get_num_threads())
        lib.int4_gemm_small(x.data_ptr(), x.shape[0], self.in_features, q, s, z, b, self.out_features,
                            self.group_size, y.data_ptr(), torch.get_num_threads())

    def _cpu_fused(self, lib, x):
        if self.group_size > cpu_quant.MAX_GROUP:
            return self._dequant_matmul(x)
        if self._q8(x.shape[0]) is not None:
            y = torch.empty((1, self.out_features))
            self._fused_into(lib, x.detach().float().contiguous(), y)
            return y
        return quant_matmul.int4_fused_cpu(lib, x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def _cpu_tiled(self, lib, x, bf16=False):
        return quant_matmul.int4_tiled_cpu(lib, x, self.qweight, self.scales, self.zeros, self.group_size, self.bias,
                                      bf16)

    def _make_kernel(self, path, device):
        return quant_matmul.make_int4(path, self.qweight, self.scales, self.zeros, self.group_size, device)


class QuantEmbedding(nn.Module):
    """nn.Embedding over a quantised [num_embeddings, dim] table; only looked-up rows are dequantised.
    With ``tied_to`` (the quantised lm_head of a tied-embedding LM) it shares that module's buffers."""

    def __init__(self, table: QuantLinearBase, padding_idx: int | None = None, tied: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.padding_idx, self.tied, self.bits = padding_idx, tied, table.bits
        self.group_size = getattr(table, "group_size", None)
        for name, buf in table.named_buffers(recurse=False):
            self.register_buffer(name, buf)  # the same tensor objects: no copy when tied
        if getattr(table, "zeros", "absent") is None:
            self.zeros = None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, tied={self.tied}"

    @property
    def weight(self) -> torch.Tensor:
        """An EMPTY [0, D] fp32 tensor on the table's device: only for code that reads
        ``embedding.weight.dtype`` / ``.device`` (the rows are dequantised to fp32)."""
        return torch.empty((0, self.embedding_dim), dtype=torch.float32, device=self.qweight.device)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.bits == 8:
            rows = packing.dequantize_int8(self.qweight[flat], self.scale[flat])
        else:
            zeros = None if self.zeros is None else self.zeros[flat]
            rows = packing.dequantize_int4(self.qweight[flat], self.scales[flat], zeros, self.group_size)
        return rows.reshape(*ids.shape, self.embedding_dim)                   # [..., D]


def embedding_table(embedding: nn.Embedding, bits: int, group_size: int = 64, symmetric: bool = False,
                    refine: int = 0):
    """An nn.Embedding's [V, D] table quantised as if it were Linear(D, V) (the lm_head view)."""
    as_linear = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
    as_linear.weight = embedding.weight
    if bits == 8:
        return Int8Linear.from_linear(as_linear)
    return Int4Linear.from_linear(as_linear, group_size, symmetric, refine=refine)
