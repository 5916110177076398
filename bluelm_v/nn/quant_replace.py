"""Streaming, in-place replacement of nn.Linear / nn.Embedding layers by quantised ones.

Layers are looked up by name one at a time and each fp32 weight is dropped as soon as its
quantised replacement is in place, so at most one fp32 layer is alive beyond what the caller
still holds: quantising a model never needs the fp32 model and its quantised copy at once.
Layers on the meta device are first materialised by ``materialize(name, module)`` (a full-size
model can be built on meta, then filled and quantised one layer at a time).

Shapes are checked for every selected layer BEFORE the first one is replaced, so an unsupported
shape fails with nothing half-quantised.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from bluelm_v.nn.quant_linear import QuantEmbedding, QuantLinearBase, embedding_table

BAD_SHAPE_POLICIES = ("error", "skip", "smaller_group")


@dataclass
class ReplaceReport:
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # by pattern or bad shape
    regrouped: dict[str, int] = field(default_factory=dict)   # name -> group size actually used
    weight_bytes: int = 0

    def as_dict(self) -> dict:
        return {"replaced": len(self.replaced), "skipped": self.skipped, "regrouped": self.regrouped,
                "weight_bytes": self.weight_bytes}


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return root, name
    path, attr = name.rsplit(".", 1)
    return root.get_submodule(path), attr


def linear_names(root: nn.Module, skip=()) -> list[str]:
    return [n for n, m in root.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]


def choose_group(in_features: int, group_size: int, policy: str) -> int | None:
    """The group size a layer gets under ``policy`` (None: leave the layer unquantised)."""
    if in_features % group_size == 0:
        return group_size
    if policy == "smaller_group":
        return next((g for g in (128, 64, 32) if g < group_size and in_features % g == 0), None)
    return None


def plan_int4(root: nn.Module, group_size: int, policy: str, skip=()) -> tuple[dict[str, int], list[str]]:
    """name -> group size for every Linear that will become Int4Linear; the names left alone.
    Raises ValueError (listing every offending layer) under policy 'error'."""
    if policy not in BAD_SHAPE_POLICIES:
        raise ValueError(f"on_bad_shape must be one of {list(BAD_SHAPE_POLICIES)}, got {policy!r}")
    plan, bad = {}, []
    for name in linear_names(root, skip):
        k = root.get_submodule(name).in_features
        g = choose_group(k, group_size, policy)
        if g is None:
            bad.append(f"{name} (in_features={k})")
        else:
            plan[name] = g
    if bad and policy == "error":
        raise ValueError(f"in_features not divisible by group_size={group_size} for {len(bad)} layer(s): "
                         f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; set on_bad_shape=skip "
                         f"(keep them fp32) or smaller_group, or list them in skip")
    return plan, [b.split(" ")[0] for b in bad]


def replace_linears(root: nn.Module, plan: dict[str, dict], make: Callable[[nn.Linear, dict], nn.Module],
                    materialize: Callable[[str, nn.Module], None] | None = None,
                    report: ReplaceReport | None = None) -> ReplaceReport:
    """Replace each Linear named in ``plan`` by ``make(linear, plan[name])``, one at a time."""
    report = report or ReplaceReport()
    for name in plan:
        parent, attr = _parent(root, name)
        linear = getattr(parent, attr)
        if linear.weight.is_meta:
            if materialize is None:
                raise ValueError(f"{name}: weight is on the meta device and no materialize function was given")
            materialize(name, linear)
        q = make(linear, plan[name])
        setattr(parent, attr, q)
        del linear  # the fp32 weight is freed here unless something else (a tied table) holds it
        report.replaced.append(name)
        report.weight_bytes += q.weight_bytes()
    return report


def tied_embeddings(root: nn.Module) -> dict[str, str]:
    """embedding name -> name of the Linear that shares its weight tensor (tied lm_head)."""
    by_weight = {id(m.weight): n for n, m in root.named_modules() if type(m) is nn.Linear}
    return {n: by_weight[id(m.weight)] for n, m in root.named_modules()
            if type(m) is nn.Embedding and id(m.weight) in by_weight}


def replace_embeddings(root: nn.Module, bits: int, group_size: int, symmetric: bool, policy: str,
                       tied: dict[str, str], skip=(), materialize=None,
                       report: ReplaceReport | None = None, refine: int = 0) -> ReplaceReport:
    """Quantise every nn.Embedding (dim checked like a Linear's in_features). An embedding whose
    table is tied to a Linear that is already quantised re-uses that module's buffers."""
    report = report or ReplaceReport()
    for name in [n for n, m in root.named_modules() if type(m) is nn.Embedding and not _matches(n, skip)]:
        parent, attr = _parent(root, name)
        emb = getattr(parent, attr)
        head = root.get_submodule(tied[name]) if name in tied else None
        if isinstance(head, QuantLinearBase):
            setattr(parent, attr, QuantEmbedding(head, emb.padding_idx, tied=True))
            report.replaced.append(name)
            continue
        g = group_size
        if bits == 4:
            g = choose_group(emb.embedding_dim, group_size, policy)
            if g is None:
                if policy == "error":
                    raise ValueError(f"{name}: embedding_dim={emb.embedding_dim} is not divisible by "
                                     f"group_size={group_size}")
                report.skipped.append(name)
                continue
        if emb.weight.is_meta:
            if materialize is None:
                raise ValueError(f"{name}: weight is on the meta device and no materialize function was given")
            materialize(name, emb)
        table = embedding_table(emb, bits, g, symmetric, refine)
        setattr(parent, attr, QuantEmbedding(table, emb.padding_idx))
        if g != group_size:
            report.regrouped[name] = g
        report.replaced.append(name)
        report.weight_bytes += table.weight_bytes()
    return report
