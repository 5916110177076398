"""The shapes a cost model needs, read from real torch modules (no forward pass, no weights).

    enc = encoder_shape(encoder_module)     # StackShape: 26 layers of SigLIP so400m, conv patch
    llm = llm_shape(causal_lm_module)       # StackShape: 40 layers, heads, lm_head, embeddings
    proj = mlp_shape(projector_module)      # the projector's linears, applied per visual token

Modules built on the meta device work (they hold shapes, no memory), so the full-size presets
(so400m, bluelm_3b_proxy) cost nothing to describe. ``cached_shapes`` keeps the result on disk
keyed by the config nodes and the source of the code that builds them, so a process that only
costs a model (a simulated phone's actor) need not import torch again. Every Linear-like module (anything with
``in_features``/``out_features``, so quantised replacements count too) inside the repeated layer
stack is applied to every token; those outside it (an LLM's lm_head) once per output position.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def flops(self, rows: int) -> float:
        return 2.0 * rows * self.params


@dataclass(frozen=True)
class ConvShape:
    """A patch-embedding convolution: [3,B,B] -> [T, out_channels]."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int

    @property
    def params(self) -> int:
        return self.in_channels * self.out_channels * self.kernel * self.kernel

    def flops(self, positions: int) -> float:
        return 2.0 * positions * self.params


@dataclass(frozen=True)
class StackShape:
    """A transformer stack: ``layers`` identical blocks (+ what sits around them)."""

    layers: int
    block: tuple[LinearShape, ...]            # the linears of one block
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    per_output: tuple[LinearShape, ...] = ()  # applied once per produced position (lm_head)
    patch: ConvShape | None = None            # encoders: the patch embedding
    tokens_per_item: int = 0                  # encoders: tokens per tile (729 for 384/14)
    embedding_params: int = 0                 # lookup tables (token / position embeddings)
    total_params: int = 0                     # unique parameters (tied weights counted once)

    @property
    def block_params(self) -> int:
        return sum(lin.params for lin in self.block)

    @property
    def stack_params(self) -> int:
        return self.layers * self.block_params

    def kv_bytes_per_token(self, kv_bits: int) -> float:
        """K and V of one token over all layers."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * kv_bits / 8


def _is_linear(mod) -> bool:
    return isinstance(getattr(mod, "in_features", None), int) and isinstance(getattr(mod, "out_features", None), int)


def _layer_stack(module):
    """The longest ModuleList of identical blocks that contain linears: (name, list)."""
    import torch

    best = ("", None)
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 \
                and any(_is_linear(m) for m in mod[0].modules()):
            if best[1] is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best[1] is None:
        raise ValueError(f"{type(module).__name__} has no stack of transformer layers (nn.ModuleList)")
    return best


def _block_linears(block) -> tuple[LinearShape, ...]:
    return tuple(LinearShape(n, m.in_features, m.out_features) for n, m in block.named_modules() if _is_linear(m))


def _attention_dims(block, config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of a block, from its attention module and the config."""
    for _, mod in block.named_modules():
        q, k = getattr(mod, "q_proj", None), getattr(mod, "k_proj", None)
        if q is None or k is None or not _is_linear(q):
            continue
        cfg = getattr(mod, "config", None) or config
        heads = getattr(mod, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
        head_dim = getattr(mod, "head_dim", None) or (q.out_features // heads if heads else None)
        if not heads or not head_dim:
            raise ValueError(f"cannot read the number of heads of {type(mod).__name__}")
        return int(heads), int(k.out_features // head_dim), int(head_dim)
    raise ValueError(f"{type(block).__name__} has no attention module with q_proj/k_proj")


def _unique_params(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _stack_shape(module, config, **extra_fields) -> StackShape:
    import torch

    stack_name, stack = _layer_stack(module)
    block = _block_linears(stack[0])
    for i, other in enumerate(stack):
        if _block_linears(other) != block:
            raise ValueError(f"{stack_name}.{i} differs from {stack_name}.0: the cost model needs identical blocks")
    heads, kv_heads, head_dim = _attention_dims(stack[0], config)
    in_stack = {id(m) for m in stack.modules()}
    outside = [(n, m) for n, m in module.named_modules() if id(m) not in in_stack]
    per_output = tuple(LinearShape(n, m.in_features, m.out_features) for n, m in outside if _is_linear(m))
    emb = sum(m.weight.numel() for _, m in outside if isinstance(m, torch.nn.Embedding))
    hidden = block[0].in_features
    return StackShape(layers=len(stack), block=block, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      hidden=hidden, per_output=per_output, embedding_params=emb,
                      total_params=_unique_params(module), **extra_fields)


def encoder_shape(encoder) -> StackShape:
    """A ViT encoder module (e.g. the ``siglip`` plugin's): its layers, heads, patch conv, tokens."""
    import torch

    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(encoder).__name__} has no patch-embedding Conv2d")
    c = convs[0]
    patch = ConvShape(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0])
    tokens = getattr(encoder, "num_tokens", None)
    if tokens is None:
        side = (getattr(encoder, "image_size") - patch.kernel) // patch.stride + 1
        tokens = side * side
    shape = _stack_shape(encoder, getattr(encoder, "config", None), patch=patch, tokens_per_item=int(tokens))
    # An encoder has no per-output head: every linear outside the stack would be a pooling head.
    return StackShape(**{**shape.__dict__, "per_output": ()})


def llm_shape(causal_lm) -> StackShape:
    """A causal LM (transformers-style ``model.layers`` + ``lm_head``)."""
    return _stack_shape(causal_lm, getattr(causal_lm, "config", None))


def mlp_shape(module) -> tuple[LinearShape, ...]:
    """Every linear of a small per-token module (a projector), in order."""
    return tuple(LinearShape(n, m.in_features, m.out_features) for n, m in module.named_modules() if _is_linear(m))


# -- a disk cache of shapes -------------------------------------------------------------------
def _to_json(shapes: dict) -> dict:
    return {k: (asdict(v) if isinstance(v, StackShape) else [asdict(x) for x in v] if isinstance(v, tuple) else v)
            for k, v in shapes.items()}


def _from_json(data: dict) -> dict:
    def stack(d):
        return StackShape(**{**d, "block": tuple(LinearShape(**x) for x in d["block"]),
                             "per_output": tuple(LinearShape(**x) for x in d["per_output"]),
                             "patch": ConvShape(**d["patch"]) if d["patch"] else None})
    return {k: stack(v) if isinstance(v, dict) else tuple(LinearShape(**x) for x in v) if isinstance(v, list) else v
            for k, v in data.items()}


def _source_digest(objects) -> str:
    """Hash of the source files of ``objects`` (functions, classes or module names)."""
    from importlib.util import find_spec

    h = hashlib.sha1()
    for obj in objects:
        try:
            path = find_spec(obj).origin if isinstance(obj, str) else inspect.getsourcefile(obj)
            h.update(Path(path).read_bytes())
        except (TypeError, OSError, ValueError, ImportError):
            h.update(repr(obj).encode())
    return h.hexdigest()


def cached_shapes(nodes: dict, registry, compute, cache_dir: Path | None) -> dict:
    """``compute()`` (a dict of StackShape / linear tuples / numbers) memoised on disk under
    ``cache_dir`` by the nodes, the factories' and this module's source, and transformers'
    version. ``cache_dir=None`` disables the cache."""
    if cache_dir is None:
        return compute()
    from importlib import metadata

    factories = [registry[f].entry(n["name"]).factory for f, n in sorted(nodes.items())]
    try:
        tf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        tf = "none"
    key = hashlib.sha1(json.dumps([nodes, tf, _source_digest(factories + [StackShape, "bluelm_v.model"])],
                                  sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "npu_workloads" / f"{key}.json"
    if path.exists():
        try:
            return _from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass                                         # unreadable: rebuild and rewrite
    shapes = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_to_json(shapes)))
    os.replace(tmp, path)
    return shapes
