"""INT16 activation fake-quantisation (``a16``): simulates an NPU that feeds the LLM's linear
layers INT16 activations. Each linear input is rounded to a symmetric 16-bit grid
(x ~= s * round(x / s), q in [-32767, 32767]) with a dynamic scale s = max|x| / 32767 taken per
tensor (one scale for the whole input, the stricter NPU-like choice) or per token.
"""
from __future__ import annotations

import torch
import torch.nn as nn

GRANULARITIES = ("tensor", "token")
_HOOK_ATTR = "_bluelm_v_act_quant"


def fake_quant(x: torch.Tensor, bits: int = 16, granularity: str = "tensor") -> torch.Tensor:
    """x rounded to a symmetric ``bits``-bit grid with a dynamic scale (same shape and dtype)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = xf.abs().amax() if granularity == "tensor" else xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax, min=torch.finfo(torch.float32).tiny) / qmax
    return (torch.round(xf / scale).clamp_(-qmax, qmax) * scale).to(x.dtype)


class ActivationFakeQuant:
    """A forward pre-hook rounding a module's first input; kept on the module for describe()."""

    def __init__(self, bits: int = 16, granularity: str = "tensor"):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
        self.bits, self.granularity = bits, granularity
        self.handle = None

    def __call__(self, module, args):
        if not args or not torch.is_tensor(args[0]):
            return None
        return (fake_quant(args[0], self.bits, self.granularity), *args[1:])

    def __repr__(self) -> str:
        return f"ActivationFakeQuant(bits={self.bits}, granularity={self.granularity})"


def add_activation_quant(module: nn.Module, bits: int = 16, granularity: str = "tensor") -> bool:
    """Attach the fake-quant pre-hook to ``module`` (once); False when it already had one."""
    if getattr(module, _HOOK_ATTR, None) is not None:
        return False
    hook = ActivationFakeQuant(bits, granularity)
    hook.handle = module.register_forward_pre_hook(hook)
    setattr(module, _HOOK_ATTR, hook)
    return True


def activation_quant_of(module: nn.Module):
    return getattr(module, _HOOK_ATTR, None)


def remove_activation_quant(module: nn.Module) -> None:
    hook = getattr(module, _HOOK_ATTR, None)
    if hook is not None:
        hook.handle.remove()
        setattr(module, _HOOK_ATTR, None)
