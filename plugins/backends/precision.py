"""What a quantizer setting means for a device: bits per part and the compute path.

    precision_plan({"name": "bluelm_mixed"}) -> {"encoder": Precision(8, 16, float),
        "projector": Precision(8, 16, float), "llm": Precision(4, 16, int), "kv_bits": 8}

The quantizer names and ``targets`` are those of plugins/quantizers/ (docs/design.md §3):
``none`` (no integer weights: FP16 on a phone NPU), ``w8`` (INT8 weights, default targets
encoder/projector), ``w4`` (INT4 weights, default target llm), ``kv8`` (INT8 KV cache), ``a16``
(integer activations of ``bits``, default target llm) and ``bluelm_mixed`` (the paper's scheme:
ViT and projector W8 with FP16 activations, LLM W4 with INT``act_bits`` activations, KV cache
INT8 unless ``kv_cache: false``). A setting may also spell its plan out for the cost model:
``{name: ..., precision: {llm: {weight_bits: 4, act_bits: 16, act_float: false}, kv_bits: 8}}``;
a list of settings composes left to right.
"""
from __future__ import annotations

from bluelm_v.errors import ConfigError

from ..quantizers import quantizer_nodes

from .npu_cost import Precision

FP16 = Precision(16, 16, True)
PARTS = ("encoder", "projector", "llm")


def _parts(node: dict, default: tuple) -> list[str]:
    """The parts a quantizer node targets (its ``targets`` parameter, else its default)."""
    targets = list(node.get("targets") or default)
    return list(PARTS) if "all" in targets else [t for t in targets if t in PARTS]


def _weights(plan: dict, parts, bits: int) -> dict:
    return {**plan, **{p: Precision(bits, plan[p].act_bits, plan[p].act_float) for p in parts}}


def _none(plan, node):
    return plan


def _w8(plan, node):
    return _weights(plan, _parts(node, ("encoder", "projector")), 8)


def _w4(plan, node):
    return _weights(plan, _parts(node, ("llm",)), 4)


def _kv8(plan, node):
    return {**plan, "kv_bits": 8} if "llm" in _parts(node, ("llm",)) else plan


def _a16(plan, node):
    bits = int(node.get("bits", 16))
    return {**plan, **{p: Precision(plan[p].weight_bits, bits, False) for p in _parts(node, ("llm",))}}


def _mixed(plan, node):
    plan = _weights(plan, ("encoder", "projector"), 8)
    plan = {**plan, "llm": Precision(4, int(node.get("act_bits", 16)), False)}
    return {**plan, "kv_bits": 8} if node.get("kv_cache", True) else plan


RULES = {"none": _none, "w8": _w8, "w4": _w4, "kv8": _kv8, "a16": _a16, "bluelm_mixed": _mixed}


def _explicit(plan: dict, spec: dict) -> dict:
    plan = dict(plan)
    for key, value in spec.items():
        if key == "kv_bits":
            plan["kv_bits"] = int(value)
        elif key in PARTS and isinstance(value, dict):
            plan[key] = Precision(**{**plan[key].__dict__, **value})
        else:
            raise ConfigError(f"quantizer.precision.{key}: expected one of {list(PARTS)} (a mapping) or kv_bits")
    return plan


def precision_plan(setting) -> dict:
    """A case's quantizer setting (None, a name, a node {name, ...}, or a list of them) -> plan."""
    plan = {"encoder": FP16, "projector": FP16, "llm": FP16, "kv_bits": 16}
    for node in quantizer_nodes(setting):
        name = node.get("name")
        if "precision" in node:
            plan = _explicit(plan, dict(node["precision"]))
        elif name in RULES:
            plan = RULES[name](plan, node)
        else:
            raise ConfigError(f"quantizer: the device cost model does not know quantizer '{name}'; "
                              f"known: {sorted(RULES)} (or give its plan as quantizer.precision)")
    return plan

