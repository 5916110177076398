"""The quantisation schemes behind the ``quantizer`` registry family (plugins/quantizers/).

Every quantizer: ``apply(model, materialize=None) -> model`` (quantise in place, streaming),
``prepare(model) -> model`` (the same structure with empty meta-device buffers, to load a
checkpoint into), ``save(model, directory)`` / ``load(model, directory)`` (one safetensors file
per model part, settings in the header), ``settings()`` and ``describe()``.

Targets are model parts: ``encoder``, ``downsampler``, ``projector``, ``llm`` (attributes of a
BlueLMV); ``all`` is the whole model. A bare module (no such attributes) is one part, named
``llm`` when it is a causal LM (has ``lm_head`` or wraps a model that has one), else ``all``.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

import torch.nn as nn

from bluelm_v.errors import ConfigError
from bluelm_v.nn import quant_io
from bluelm_v.nn.activation_quant import activation_quant_of, add_activation_quant
from bluelm_v.nn.kv_cache import KV_CACHE_ATTR, kv_cache_kind  # noqa: F401 -- kv_cache_kind: part of this API
from bluelm_v.nn.quant_linear import Int4Linear, Int8Linear, QuantEmbedding, QuantLinearBase
from bluelm_v.nn.quant_replace import ReplaceReport, linear_names, plan_int4, replace_embeddings, replace_linears, tied_embeddings

PARTS = ("encoder", "downsampler", "projector", "llm")


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """part name -> module (see module docstring)."""
    found = {p: getattr(model, p) for p in PARTS if isinstance(getattr(model, p, None), nn.Module)}
    if found:
        return found
    inner = getattr(model, "model", None)
    is_lm = hasattr(model, "lm_head") or hasattr(inner, "lm_head")
    return {"llm" if is_lm else "all": model}


def _hf(module: nn.Module) -> nn.Module:
    """The transformers model inside an LM wrapper (.model), else the module itself."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "config") else module


class Quantizer:
    """Base: no change (``none``)."""

    name = "none"

    def __init__(self, targets=("all",), **params):
        self.targets = list(targets)
        self.params = params
        self.report: dict = {}

    def settings(self) -> dict:
        return {"quantizer": self.name, "targets": self.targets, **self.params}

    def describe(self) -> dict:
        return {**self.settings(), "report": self.report}

    def parts(self, model: nn.Module, required: bool = True) -> dict[str, nn.Module]:
        parts = model_parts(model)
        picked = {n: m for n, m in parts.items() if n == "all" or "all" in self.targets or n in self.targets}
        if required and not picked and self.targets:
            raise ConfigError(f"quantizer.targets: none of {self.targets} is a part of this model "
                              f"(its parts: {sorted(parts)}); set targets: [all] to quantise the whole module")
        return picked

    def apply(self, model: nn.Module, materialize=None) -> nn.Module:
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    # -- checkpoints (every part of the model, quantised or not) -------------------------------
    def save(self, model: nn.Module, directory: str | Path) -> dict:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, part in model_parts(model).items():
            if part.state_dict():
                out[name] = quant_io.save_quantized(part, directory / f"{name}.safetensors", self.settings(), name)
        return out

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """``prepare`` the structure, then load every part file (all checked before assigning)."""
        self.prepare(model)
        return self.load_parts(model, directory)

    def load_parts(self, model: nn.Module, directory: str | Path, names=None) -> nn.Module:
        """Load the part files ``names`` (default: every part) into an already ``prepare``d
        model, e.g. the ViT first and the LLM only after the ViT is released (all files named
        are checked before anything is assigned)."""
        directory = Path(directory)
        parts = {n: p for n, p in model_parts(model).items() if p.state_dict() and (names is None or n in names)}
        tensors = {n: quant_io.read_quantized(directory / f"{n}.safetensors", self.settings(), p.state_dict(keep_vars=True))
                   for n, p in parts.items()}
        for n, p in parts.items():
            p.load_state_dict(tensors.pop(n), strict=True, assign=True)
        return model


class W8(Quantizer):
    """INT8 per-output-channel weights for every nn.Linear of the target parts."""

    name = "w8"

    def __init__(self, targets=("encoder", "downsampler", "projector"), act_dtype: str = "fp32",
                 embeddings: bool = False, skip=(), kernel: str = "auto"):
        super().__init__(targets, act_dtype=act_dtype, embeddings=embeddings, skip=list(skip), kernel=kernel)

    def _run(self, model, make, materialize=None):
        p = self.params
        for part_name, part in self.parts(model).items():
            tied = tied_embeddings(part)
            rep = replace_linears(part, {n: {} for n in linear_names(part, p["skip"])}, make, materialize)
            if p["embeddings"]:
                replace_embeddings(part, 8, 0, True, "error", tied, p["skip"], materialize, rep)
            self.report[part_name] = rep.as_dict()
        return model

    def apply(self, model, materialize=None):
        p = self.params
        return self._run(model, lambda lin, _: Int8Linear.from_linear(lin, p["kernel"], p["act_dtype"]), materialize)

    def prepare(self, model):
        p = self.params
        return self._run(model, lambda lin, _: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                           p["kernel"], p["act_dtype"], device="meta"),
                         materialize=lambda name, m: None)


class W4(Quantizer):
    """Group-wise INT4 weights (packed two per byte) for every nn.Linear of the target parts.
    The embedding tables and the output head (``*lm_head`` or a Linear tied to an embedding) get
    ``embedding_bits``: 8 (INT8 per row, llama.cpp's habit for Q4 files), 4 (INT4 like the rest)
    or None (left in float)."""

    name = "w4"

    def __init__(self, targets=("llm",), group_size: int = 64, symmetric: bool = False,
                 embedding_bits: int | None = 8, on_bad_shape: str = "error", skip=(), kernel: str = "auto",
                 refine: int = 0):
        if embedding_bits not in (4, 8, None):
            raise ValueError(f"embedding_bits must be 4, 8 or None, got {embedding_bits!r}")
        super().__init__(targets, group_size=group_size, symmetric=symmetric, embedding_bits=embedding_bits,
                         on_bad_shape=on_bad_shape, skip=list(skip), kernel=kernel, refine=refine)

    def _plans(self, part):
        """(int4 plan, head plan, names left out) for one part; every shape checked here."""
        p = self.params
        heads = set(tied_embeddings(part).values())
        heads |= {n for n in linear_names(part, p["skip"]) if n == "lm_head" or n.endswith(".lm_head")}
        plan, bad = plan_int4(part, p["group_size"], p["on_bad_shape"], p["skip"] + sorted(heads))
        head_plan = {}
        if p["embedding_bits"] == 4:
            head_plan, bad_heads = plan_int4(part, p["group_size"], p["on_bad_shape"],
                                             p["skip"] + [n for n in linear_names(part) if n not in heads])
            bad += bad_heads
        elif p["embedding_bits"] == 8:
            head_plan = {h: 0 for h in heads if not any(fnmatch.fnmatchcase(h, s) for s in p["skip"])}
        return plan, head_plan, bad

    def _run(self, model, make4, make8, materialize=None):
        p = self.params
        parts = self.parts(model)
        plans = {n: self._plans(part) for n, part in parts.items()}
        for part_name, part in parts.items():   # every shape checked above: nothing half-quantised
            plan, head_plan, bad = plans[part_name]
            tied = tied_embeddings(part)
            rep = replace_linears(part, plan, make4, materialize, ReplaceReport(skipped=list(bad)))
            replace_linears(part, head_plan, make4 if p["embedding_bits"] == 4 else make8, materialize, rep)
            rep.regrouped.update({n: g for n, g in {**plan, **head_plan}.items() if g and g != p["group_size"]})
            if p["embedding_bits"] is not None:
                replace_embeddings(part, p["embedding_bits"], p["group_size"], p["symmetric"], p["on_bad_shape"],
                                   tied, p["skip"], materialize, rep, p["refine"])
            self.report[part_name] = rep.as_dict()
        return model

    def apply(self, model, materialize=None):
        p = self.params
        return self._run(model, lambda lin, g: Int4Linear.from_linear(lin, g, p["symmetric"], p["kernel"], refine=p["refine"]),
                         lambda lin, _: Int8Linear.from_linear(lin, p["kernel"]), materialize)

    def prepare(self, model):
        p = self.params
        return self._run(model, lambda lin, g: Int4Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                           g, p["symmetric"], p["kernel"], device="meta"),
                         lambda lin, _: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                   p["kernel"], device="meta"),
                         materialize=lambda name, m: None)


class A16(Quantizer):
    """INT16 fake-quantisation of the inputs of every linear layer of the target parts."""

    name = "a16"

    def __init__(self, targets=("llm",), bits: int = 16, granularity: str = "tensor", skip=()):
        super().__init__(targets, bits=bits, granularity=granularity, skip=list(skip))

    def apply(self, model, materialize=None):
        import fnmatch

        p = self.params
        for part_name, part in self.parts(model).items():
            n = 0
            for name, m in part.named_modules():
                if isinstance(m, (nn.Linear, QuantLinearBase)) and not any(fnmatch.fnmatchcase(name, s) for s in p["skip"]):
                    n += add_activation_quant(m, p["bits"], p["granularity"])
            self.report[part_name] = {"hooked_linears": n}
        return model

    prepare = apply   # hooks carry no tensors: the same on an empty structure


class KV8(Quantizer):
    """INT8 KV cache: marks the LLM so the runtime builds an Int8 cache (kv_cache.py)."""

    name = "kv8"
    ATTR = KV_CACHE_ATTR

    def __init__(self, targets=("llm",)):
        super().__init__(targets)

    def apply(self, model, materialize=None):
        for part_name, part in self.parts(model).items():
            for m in {id(part): part, id(_hf(part)): _hf(part)}.values():
                object.__setattr__(m, self.ATTR, "int8")
            self.report[part_name] = {"kv_cache": "int8 per-token per-head scales"}
        return model

    prepare = apply


class Composite(Quantizer):
    """Several quantizers applied in order (weights first, then activation hooks and KV)."""

    def __init__(self, name: str, steps: list[Quantizer], **params):
        super().__init__(targets=sorted({t for s in steps for t in s.targets}), **params)
        self.name, self.steps = name, steps

    def settings(self) -> dict:
        return {"quantizer": self.name, **self.params, "steps": [s.settings() for s in self.steps]}

    def describe(self) -> dict:
        return {**self.settings(), "report": {s.name: s.report for s in self.steps}}

    def apply(self, model, materialize=None):
        for step in self.steps:
            if step.parts(model, required=False):
                step.apply(model, materialize)
        return model

    def prepare(self, model):
        for step in self.steps:
            if step.parts(model, required=False):
                step.prepare(model)
        return model


SETTING_LABELS = {"w4": "INT4 weights", "w8": "INT8 weights", "a16": "integer activations", "kv8": "INT8 KV cache"}


def applied_settings(model: nn.Module) -> dict[str, str]:
    """The quantizer settings a model carries -> where the first sign of each is: ``w4`` /
    ``w8`` (integer linear layers or embedding tables of that width), ``a16`` (activation
    rounding hooks), ``kv8`` (the INT8 KV-cache mark). What an engine or backend that cannot
    honour a setting names when it refuses the model."""
    found: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinearBase, QuantEmbedding)):
            found.setdefault(f"w{m.bits}", name or "the model")
        if activation_quant_of(m) is not None:
            found.setdefault("a16", name or "the model")
    if kv_cache_kind(model) == "int8":
        found["kv8"] = "the model's KV cache"
    return found


def describe_settings(found: dict[str, str]) -> str:
    """``applied_settings`` as one phrase: "w4 (INT4 weights, e.g. model.layers.0.mlp.up_proj), ..."."""
    return ", ".join(f"{k} ({SETTING_LABELS.get(k, 'quantised')}, e.g. {v})" for k, v in sorted(found.items()))


def weight_bytes(module: nn.Module) -> dict:
    """{'quantized': bytes of packed weights, 'float': bytes of every other parameter/buffer}."""
    q = sum(m.weight_bytes() for m in module.modules() if isinstance(m, QuantLinearBase))
    seen = {id(b) for m in module.modules() if isinstance(m, (QuantLinearBase, QuantEmbedding))
            for b in m.buffers(recurse=False)}
    q += sum(m.weight_bytes() for m in module.modules() if isinstance(m, QuantEmbedding) and not m.tied)
    rest, counted = 0, set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen or id(t) in counted or t.is_meta:
            continue
        counted.add(id(t))
        rest += t.numel() * t.element_size()
    return {"quantized": q, "float": rest, "total": q + rest}
