"""Optimizer pieces of the two training stages (docs/design.md §4): which parameters train, AdamW parameter
groups with weight decay and the ViT's layer-wise LR decay, and the warm-up + cosine schedule.

    groups = build_param_groups(model, trainable=["projector", "downsampler"], lr=1e-3, weight_decay=0.05)
    freeze_except(model, ["projector", "downsampler"])        # stage 1
    lr_multiplier(step, total_steps, warmup_steps)             # in [0, 1]

The schedule is a pure function of the step, so nothing about it needs to be checkpointed.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Iterable

MODEL_PARTS = ("encoder", "downsampler", "projector", "llm")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h|resblocks)\.(\d+)\.")


def freeze_except(model, trainable: Iterable[str]) -> dict[str, int]:
    """requires_grad=True on the parameters of the named parts only; returns trainable counts."""
    trainable = set(trainable)
    unknown = trainable - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"unknown model part(s) {sorted(unknown)}; parts: {', '.join(MODEL_PARTS)}")
    counts = {}
    for part in MODEL_PARTS:
        module = getattr(model, part, None)
        if module is None:
            continue
        n = 0
        for p in module.parameters():
            p.requires_grad_(part in trainable)
            n += p.numel() if part in trainable else 0
        counts[part] = n
    return counts


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer-wise LR decay depth of an encoder parameter (BEiT convention): embeddings 0,
    transformer block i -> i + 1, everything after the blocks (final norm, head) num_layers + 1."""
    m = _LAYER_INDEX.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embed" in name or "patch" in name or "pos" in name.split(".")[-1]:
        return 0
    return num_layers + 1


def count_vit_layers(names: Iterable[str]) -> int:
    ids = [int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))]
    return max(ids) + 1 if ids else 0


def build_param_groups(model, trainable: Iterable[str], lr: float, weight_decay: float,
                       encoder_layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups over the trainable parts (each part's parameters must already have
    requires_grad set, see :func:`freeze_except`).

    No weight decay on 1-D tensors (biases, norm scales). Encoder parameters get
    lr * encoder_layer_decay ** (L + 1 - layer_id) (1.0 = no decay). Each group carries
    ``name`` and ``lr_scale`` so a schedule can set lr = peak * lr_scale * multiplier(step)."""
    trainable = list(trainable)
    buckets: dict[tuple[str, float, bool], list] = {}
    for part in MODEL_PARTS:
        module = getattr(model, part, None)
        if module is None or part not in trainable:
            continue
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        num_layers = count_vit_layers(n for n, _ in named) if part == "encoder" else 0
        for name, p in named:
            scale = 1.0
            if part == "encoder" and encoder_layer_decay != 1.0:
                scale = encoder_layer_decay ** (num_layers + 1 - vit_layer_id(name, num_layers))
            decay = p.ndim >= 2
            buckets.setdefault((part, scale, decay), []).append(p)
    groups = []
    for (part, scale, decay), params in buckets.items():
        groups.append({"params": params, "name": f"{part}_s{scale:.4g}_{'wd' if decay else 'nowd'}",
                       "lr": lr * scale, "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0})
    if not groups:
        raise ValueError(f"no trainable parameters in parts {trainable}")
    return groups


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.
    ``step`` counts from 0 (the multiplier used by the first optimizer step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0


def set_lr(optimizer, peak_lr: float, scales: list[float], multiplier: float) -> float:
    """Write lr = peak * scale_i * multiplier into each param group (DeepSpeed's ZeRO optimizers
    keep the groups of the wrapped torch optimizer in order). Returns the unscaled lr."""
    groups = optimizer.param_groups
    if len(groups) != len(scales):
        raise RuntimeError(f"optimizer has {len(groups)} param groups, expected {len(scales)}")
    for g, s in zip(groups, scales):
        g["lr"] = peak_lr * s * multiplier
    return peak_lr * multiplier


def state_digest(module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes): equal digests mean
    bit-identical weights. Used to prove that stage 1 leaves the frozen parts untouched."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
