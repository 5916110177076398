"""Check the CUDA paths of the quantised layers against their dequantised reference.

    python3 bench/check_quant_cuda.py        # on a machine with a GPU; prints one line per case
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bluelm_v.nn.quant_linear import Int4Linear, Int8Linear  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    for cls, shape, kw in [(Int4Linear, (2304, 5760), {"group_size": 64}), (Int4Linear, (576, 1536), {"group_size": 32}),
                           (Int4Linear, (192, 96), {"group_size": 64, "symmetric": True}), (Int8Linear, (2304, 5760), {})]:
        q = cls.from_linear(nn.Linear(*shape), **kw).cuda()
        for m in (1, 128):
            x = torch.randn(m, shape[0], device="cuda")
            ref = F.linear(x, q.dequantize(dtype=torch.float32), q.bias)
            y = q(x)
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            path = q._device_kernels.get(x.device, "dequant")
            path = "dequant" if path in (None, "dequant") else "tinygemm"
            print(f"{cls.__name__}{shape} {kw} rows={m}: path={path} max rel err={err:.1e} "
                  f"{'OK' if err < 2e-2 else 'BAD'}", flush=True)


if __name__ == "__main__":
    main()
