"""Fusing projections that read the same input (q|k|v, gate|up) into one weight, in place: each
nn.Linear's weight becomes a view of the concatenated tensor (one matmul instead of several,
no memory added). Used by the LLM engines and the fast SigLIP layers."""
from __future__ import annotations

import torch


def hooked(module) -> bool:
    """A module whose forward hooks (e.g. the a16 activation rounding) must run: never read as
    raw weights."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def fuse_linears(module, names):
    """Concatenate plain nn.Linear weights into one tensor and make each a view of it (None
    when one is not a plain, hook-free nn.Linear)."""
    mods = [getattr(module, n, None) for n in names]
    if any(type(m) is not torch.nn.Linear or hooked(m) for m in mods):
        return None
    ws = [m.weight for m in mods]
    if any(w.device != ws[0].device or w.dtype != ws[0].dtype for w in ws):
        return None
    if any(m.bias is not None for m in mods) and not all(m.bias is not None for m in mods):
        return None
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in ws])                   # [sum(out), in]
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=m.bias.requires_grad)
        start += n
    return weight, bias
