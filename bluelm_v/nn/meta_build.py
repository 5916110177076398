"""Full-size models without a full-size fp32 copy: build on the meta device, then fill and
quantise one layer at a time (the memory job's build step, and loading quantised checkpoints).

    model = build_meta_model(cfg, registry)               # BlueLMV, every tensor on meta
    quantizer.apply(model, materialize=RandomInit(seed))  # each Linear: random fp32 -> quantised
    materialize_remaining(model, RandomInit(seed))        # norms, conv, position tables, rotary
    # or, for a saved checkpoint:
    quantizer.load(model, ckpt_dir); materialize_remaining(model)   # only non-persistent buffers
"""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn
from omegaconf import OmegaConf


def build_meta_model(cfg, registry):
    """BlueLMV from ``cfg`` with every part on the meta device (nothing allocated)."""
    from bluelm_v.model import BlueLMV

    node = OmegaConf.to_container(cfg, resolve=True)
    for part in ("encoder", "llm"):
        node[part] = {**node[part], "device": "meta"}
    with torch.device("meta"):
        return BlueLMV.from_config(OmegaConf.create(node), registry)


class RandomInit:
    """Deterministic N(0, std) weights per module NAME (independent of the order of calls)."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def __call__(self, name: str, module: nn.Module) -> None:
        """Give a meta Linear / Embedding a real fp32 weight (bias zero)."""
        gen = self.generator(name)
        w = module.weight
        module.weight = nn.Parameter(torch.randn(w.shape, generator=gen).mul_(self.std), requires_grad=False)
        if getattr(module, "bias", None) is not None and module.bias.is_meta:
            module.bias = nn.Parameter(torch.zeros(module.bias.shape), requires_grad=False)

    def fill(self, module: nn.Module, name: str, tensor_name: str, t: torch.Tensor) -> torch.Tensor:
        """A value for any other meta tensor: norm weights 1, biases 0, others N(0, std)."""
        if tensor_name == "bias":
            return torch.zeros(t.shape, dtype=t.dtype)
        if type(module).__name__.endswith("Norm") and tensor_name == "weight":
            return torch.ones(t.shape, dtype=t.dtype)
        return torch.randn(t.shape, generator=self.generator(f"{name}.{tensor_name}")).mul_(self.std).to(t.dtype)


def materialize_remaining(model: nn.Module, init: RandomInit | None = None) -> list[str]:
    """Allocate every tensor still on meta: rotary tables are rebuilt from their config and
    ``position_ids`` buffers set to arange; other parameters/buffers need ``init`` (else
    ValueError naming them). Returns the names that were filled."""
    filled, missing = [], []
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent, _, child = name.rpartition(".")
            with torch.device("cpu"):
                setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=module.config))
            filled.append(name)
            continue
        for kind in ("_parameters", "_buffers"):
            for tname, t in list(getattr(module, kind).items()):
                if t is None or not t.is_meta:
                    continue
                full = f"{name}.{tname}" if name else tname
                if tname == "position_ids":
                    value = torch.arange(t.shape[-1]).expand(t.shape).clone()
                elif init is not None:
                    value = init.fill(module, name, tname, t)
                else:
                    missing.append(full)
                    continue
                getattr(module, kind)[tname] = nn.Parameter(value, requires_grad=False) if kind == "_parameters" else value
                filled.append(full)
    if missing:
        raise ValueError(f"tensors still on the meta device and no initialiser: {missing[:8]}")
    return filled


def release_module(module: nn.Module) -> int:
    """Free every parameter and buffer of ``module`` (e.g. the ViT after encoding); returns bytes."""
    freed = 0
    for m in module.modules():
        for kind in ("_parameters", "_buffers"):
            store = getattr(m, kind)
            for name, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                freed += t.numel() * t.element_size()
                empty = torch.empty(0, dtype=t.dtype, device=t.device)
                store[name] = nn.Parameter(empty, requires_grad=False) if kind == "_parameters" else empty
    return freed
