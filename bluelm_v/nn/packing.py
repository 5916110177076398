"""Weight quantisation formats (pure torch, any device).

INT8, per output channel, symmetric:     w[n, k] ~= scale[n] * q[n, k],     q in [-127, 127]
INT4, group-wise along the input dim (g = group size, k // g = group index):
  symmetric:   w[n, k] ~= scale[n, k // g] * (q[n, k] - 8)                   q in [0, 15]
  asymmetric:  w[n, k] ~= scale[n, k // g] * q[n, k] + zero[n, k // g]       q in [0, 15]
  Symmetric scales are signed (the group's largest-magnitude value maps exactly to q = 0,
  i.e. -8, the way llama.cpp's Q4_0 uses all 16 levels); asymmetric groups span [min, max]
  (like Q4_1) and ``zero`` is a float zero point in the weight domain.
Packed storage: two 4-bit codes per byte, ``packed[n, j] = q[n, 2j] | q[n, 2j + 1] << 4``, so
a [N, K] weight is a uint8 [N, K/2] buffer (1/8 of fp32) plus fp16 scales (+ zeros) [N, K/g].

Big matrices are quantised ``row_block`` rows at a time so the transient fp32 work stays small.
"""
from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
INT4_GROUP_SIZES = (32, 64, 128)


def check_int4_shape(in_features: int, group_size: int, where: str = "weight") -> None:
    """Raise ValueError when a [*, in_features] weight cannot be cut into groups of group_size."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(INT4_GROUP_SIZES)}, got {group_size}")
    if in_features % group_size != 0:
        raise ValueError(f"{where}: in_features={in_features} is not divisible by group_size="
                         f"{group_size}; use a group size that divides it or leave this layer unquantised")


# -- INT8 -------------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor, row_block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q int8 [N, K], scale float32 [N])."""
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for r in range(0, n, row_block):
        w = weight[r:r + row_block].float()                                   # [b, K]
        s = w.abs().amax(dim=1) / 127.0                                       # [b]
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[r:r + row_block] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r:r + row_block] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(q int8 [N, K], scale [N]) -> weight [N, K] of ``dtype``."""
    return q.to(dtype) * scale.to(dtype)[:, None]


# -- INT4 -------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 15] (any int dtype) -> uint8 [N, K/2], low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K]."""
    n, half = packed.shape
    out = torch.empty((n, half, 2), dtype=torch.uint8, device=packed.device)
    out[..., 0] = packed & 0x0F
    out[..., 1] = packed >> 4
    return out.view(n, 2 * half)


def _codes(w, s, z):
    """Nearest INT4 codes (0..15, as float) of w [b,G,g] on the grid of s (and z; None: symmetric)."""
    return torch.round(w / s).clamp_(-8, 7) + 8 if z is None else torch.round((w - z) / s).clamp_(0, 15)


def _keep_better(best, q, s, z, e):
    """Per group, (q, s, z, e) where its error e beats best's, else best's own."""
    better = e < best[3]
    return (torch.where(better, q, best[0]), torch.where(better, s, best[1]),
            None if z is None else torch.where(better, z, best[2]), torch.minimum(e, best[3]))


def _ls_fit(w, q, symmetric: bool, fallback):
    """Least-squares (scale, zero) of w [b,G,g] for fixed codes q (zero None when symmetric)."""
    if symmetric:                          # min_s sum (s (q-8) - w)^2
        c = q - 8.0
        s = (c * w).sum(2, keepdim=True) / (c * c).sum(2, keepdim=True).clamp_min(1e-12)
        return torch.where(s != 0, s, fallback).to(SCALE_DTYPE).float(), None
    mq, mw = q.mean(2, keepdim=True), w.mean(2, keepdim=True)   # linear regression w ~ s q + z
    var = ((q - mq) ** 2).sum(2, keepdim=True)
    s = ((q - mq) * (w - mw)).sum(2, keepdim=True) / var.clamp_min(1e-12)
    s = torch.where((var > 0) & (s > 0), s, fallback).to(SCALE_DTYPE).float()
    return s, (mw - s * mq).to(SCALE_DTYPE).float()


def _search(w, best, err, n_steps: int = 20):
    """llama.cpp-style grid search: rescale the min/max grid by (15 + t) / 15 for t in [-1, 1],
    round, least-squares fit (scale, zero) to those codes; keep per group whatever has the
    lowest error. ``best`` = (q, s, z, err) is the starting point (min/max)."""
    symmetric = best[2] is None
    if symmetric:
        amax = best[1] * -8.0                                       # the signed largest value
    else:
        lo, span = w.amin(2, keepdim=True), (w.amax(2, keepdim=True) - w.amin(2, keepdim=True)).clamp_min(1e-12)
    for t in torch.linspace(-1.0, 1.0, n_steps + 1).tolist():
        if symmetric:
            q = torch.round(w / (amax / (-8.0 - t))).clamp_(-8, 7) + 8
        else:
            q = torch.round((w - lo) * ((15.0 + t) / span)).clamp_(0, 15)
        s, z = _ls_fit(w, q, symmetric, best[1])
        q = _codes(w, s, z)
        best = _keep_better(best, q, s, z, err(q, s, z))
    return best


def _refine(w, q, s, z, steps: int):
    """A grid search over scales (``_search``), then least-squares refinement of each group's
    (scale, zero) for its current codes and re-rounding, ``steps`` times; per group the
    lowest-error iterate is kept (never worse than min/max). w [b, G, g] fp32; q codes as
    float; s, z [b, G, 1] (z None: symmetric)."""
    def err(q, s, z):
        rec = s * (q - 8.0) if z is None else s * q + z
        return ((rec - w) ** 2).sum(dim=2, keepdim=True)

    best = _search(w, (q, s, z, err(q, s, z)), err)
    q = best[0]
    for _ in range(steps):
        s, z = _ls_fit(w, q, best[2] is None, best[1])
        q = _codes(w, s, z)
        best = _keep_better(best, q, s, z, err(q, s, z))
    return best[0], best[1], best[2]


def quantize_int4(weight: torch.Tensor, group_size: int = 64, symmetric: bool = False,
                  row_block: int = 2048, refine: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [N, K] float -> (packed uint8 [N, K/2], scales fp16 [N, K/g], zeros fp16 [N, K/g]
    or None when symmetric). ``refine`` > 0: that many least-squares refinements of each group's
    scale/zero (see _refine). Raises ValueError for K % group_size != 0 or odd K."""
    n, k = weight.shape
    check_int4_shape(k, group_size)
    groups = k // group_size
    dev = weight.device
    packed = torch.empty((n, k // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, groups), dtype=SCALE_DTYPE, device=dev)
    zeros = None if symmetric else torch.empty((n, groups), dtype=SCALE_DTYPE, device=dev)
    for r in range(0, n, row_block):
        w = weight[r:r + row_block].float().reshape(-1, groups, group_size)    # [b, G, g]
        if symmetric:
            idx = w.abs().argmax(dim=2, keepdim=True)
            s = (torch.gather(w, 2, idx) / -8.0).to(SCALE_DTYPE).float()      # [b, G, 1]
            s = torch.where(s != 0, s, torch.ones_like(s))
            z = None
        else:
            lo, hi = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
            s = ((hi - lo) / 15.0).to(SCALE_DTYPE).float()                    # [b, G, 1]
            s = torch.where(s > 0, s, torch.ones_like(s))
            z = lo.to(SCALE_DTYPE).float()
        q = _codes(w, s, z)
        if refine:
            q, s, z = _refine(w, q, s, z, refine)
        if z is not None:
            zeros[r:r + row_block] = z.squeeze(2).to(SCALE_DTYPE)
        scales[r:r + row_block] = s.squeeze(2).to(SCALE_DTYPE)
        packed[r:r + row_block] = pack_int4(q.reshape(w.shape[0], k))
    return packed, scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` -> weight [N, K] of ``dtype``."""
    n = packed.shape[0]
    groups = scales.shape[1]
    q = unpack_int4(packed).to(dtype).view(n, groups, group_size)            # [N, G, g]
    s = scales.to(dtype)[:, :, None]
    if zeros is None:
        w = (q - 8.0) * s
    else:
        w = q * s + zeros.to(dtype)[:, :, None]
    return w.view(n, groups * group_size)


def int4_to_torch_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None,
                                   dtype=torch.float32) -> torch.Tensor:
    """Our (scale, zero) -> the [G, N, 2] tensor torch's int4pack kernels take, where they compute
    w = (q - 8) * scale + zero'. Asymmetric: zero' = zero + 8 * scale; symmetric: zero' = 0."""
    s = scales.to(dtype)
    z = torch.zeros_like(s) if zeros is None else zeros.to(dtype) + 8.0 * s
    return torch.stack([s, z], dim=2).transpose(0, 1).contiguous()            # [G, N, 2]
