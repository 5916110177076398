"""Small typed records the stages share, and one ``typing.Protocol`` per component family.

Stages never import each other: they share the records (``Grid``, ``Crops``) and the contracts
below. The registry checks every registered component against its family's Protocol
(``contract_problems``): a class when it registers, any factory's object when it is created.
Members marked ``@optional`` may be left out; the rest must exist, and methods must accept the
arguments the framework passes (positional ones by count, keyword-only ones by name).

Nothing here imports torch or numpy: the annotations name them as strings.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Grid:
    """m tiles along the WIDTH, n tiles along the HEIGHT (docs/design.md §1)."""

    m: int
    n: int

    @property
    def tiles(self) -> int:
        return self.m * self.n

    def __iter__(self):
        return iter((self.m, self.n))

    def __str__(self) -> str:
        return f"{self.m}:{self.n}"


@dataclass
class Crops:
    """What a tiler's transform returns."""

    pixels: Any                # torch.Tensor [K, 3, B, B], normalised for the encoder
    grid: Grid                 # the chosen local grid
    n_crops: int               # K = local tiles (+1 if a thumbnail was added)
    thumbnail_index: int | None = None  # where the global view sits (0, K-1) or None
    image_size: tuple[int, int] = (0, 0)  # original (width, height)


def optional(member):
    """Marks a Protocol method a component may leave out (callers check for it)."""
    member.__optional__ = True
    return member


# -- the family contracts ---------------------------------------------------------------------
class Tiler(Protocol):
    """Image size -> grid, image -> crops (docs/design.md §2). ``m`` counts columns along the
    WIDTH, ``n`` rows along the height; every array method is numpy-vectorised."""

    tile_size: int                                   # B, the crop side in pixels

    def select(self, width, height) -> tuple[int, int]:
        """(m, n) for one image size."""

    def select_many(self, widths, heights) -> tuple["np.ndarray", "np.ndarray"]:
        """(ms, ns) int arrays for arrays of sizes: the same answers as ``select``."""

    def num_crops(self, m, n):
        """Crops for grid (m, n), the thumbnail included; ints or numpy arrays."""

    def transform(self, image) -> Crops:
        """PIL image -> Crops (pixels [K,3,B,B] float, normalised for the encoder)."""

    @optional
    def degenerate_many(self, widths, heights) -> "np.ndarray":
        """bool[N]: sizes no candidate grid holds (the tiler's fallback grid was used)."""

    @optional
    def tokens(self, widths, heights) -> "np.ndarray":
        """Visual tokens its own model feeds the LLM per size (default num_crops * tokens_per_crop)."""


class Encoder(Protocol):
    """A torch ``nn.Module``: crops [K,3,B,B] -> features [K,T,C] (T = num_tokens, C = hidden_size)."""

    hidden_size: int
    num_tokens: int
    image_size: int                                  # B, the tile side it takes

    def forward(self, pixels, *, tiles_per_batch=None, pipelined=None):
        """``tiles_per_batch`` crops per call, ``pipelined`` patch embedding (None: its own setting)."""


class Downsampler(Protocol):
    """``factory(in_dim=C, ...)`` -> ``nn.Module`` [K,T,C] -> [K,T',C'] (C' = out_dim)."""

    out_dim: int

    def out_tokens(self, tokens):
        """T' for T input tokens."""

    def forward(self, features):
        """[K,T,C] -> [K,T',C']."""


class Projector(Protocol):
    """``factory(in_dim, out_dim, ...)`` -> ``nn.Module`` [N,in_dim] -> [N,out_dim]."""

    def forward(self, tokens):
        """[..., in_dim] -> [..., out_dim]."""


class LanguageModel(Protocol):
    """``factory(...)`` -> the LLM and its tokenizer. ``model`` is a causal LM (``.config``,
    ``get_input_embeddings()``, ``forward(inputs_embeds=...)``)."""

    model: Any
    tokenizer: Any
    hidden_size: int
    max_context: int                                 # positions the model can attend over
    eos_token_ids: Any                               # set[int]: generation stops at any of them

    def embed(self, input_ids):
        """[B,L] ids -> [B,L,D] token embeddings."""


class Engine(Protocol):
    """``factory(model=causal_lm, ...)``: how the runtime runs the LLM's prefill and decode."""

    name: str
    decode_chunk: int                                # tokens worth asking ``steps`` for at once
    length: int                                      # positions in the cache
    device: Any
    cache_bytes: int

    def begin(self, max_len):
        """Start a sequence of at most ``max_len`` positions (allocate or reuse the KV cache)."""

    def prefill(self, embeds, chunk):
        """[1,L,D] embeddings, ``chunk`` rows per forward -> [V] logits of the last position."""

    def step(self, token):
        """One greedy decode step -> the next token id."""

    def steps(self, token, n):
        """``n`` greedy steps -> list of n token ids."""


class Quantizer(Protocol):
    """Rewrites a model's layers in place; checkpoints them with their settings."""

    def apply(self, model, materialize=None):
        """Quantise in place -> the model."""

    def prepare(self, model):
        """The quantised structure with empty buffers, to ``load`` into."""

    def save(self, model, directory):
        """Write the quantised parts (settings in the file header)."""

    def load(self, model, directory):
        """``prepare`` and read a checkpoint written by ``save`` with the same settings."""

    def settings(self) -> dict:
        """The settings that define its output (what checkpoints record)."""

    def describe(self) -> dict:
        """settings() plus what ``apply`` did (layers replaced, bytes)."""


class Backend(Protocol):
    """Where a built pipeline runs and is measured (one Ray actor per device drives it)."""

    def load(self, cfg, registry) -> dict:
        """Build the configured pipeline once per device -> figures of the load."""

    def run_case(self, case) -> dict:
        """One case (a plain dict) -> its measured metrics."""

    @optional
    def describe(self) -> dict:
        """What the device is (shown in the report)."""

    @optional
    def cool_down(self, seconds):
        """Wait between cases (e.g. until a phone is below its thermal limit)."""

    @optional
    def close(self):
        """Release the device and its files."""


CONTRACTS: dict[str, type] = {
    "tiler": Tiler, "encoder": Encoder, "downsampler": Downsampler, "projector": Projector,
    "llm": LanguageModel, "engine": Engine, "quantizer": Quantizer, "backend": Backend,
}


# -- checking a component against its contract ------------------------------------------------
def contract_members(protocol: type) -> tuple[dict[str, inspect.Signature], list[str]]:
    """(required methods -> signature without self, required data attributes) of a Protocol."""
    methods, attributes = {}, []
    for name, value in vars(protocol).items():
        if name.startswith("_") or getattr(value, "__optional__", False):
            continue
        if inspect.isfunction(value):
            params = list(inspect.signature(value).parameters.values())[1:]
            methods[name] = inspect.Signature(params)
    for name in vars(protocol).get("__annotations__", {}):
        if not name.startswith("_") and name not in methods:
            attributes.append(name)
    return methods, attributes


def _callable_signature(obj: Any, name: str, is_class: bool) -> inspect.Signature | None:
    """The signature a caller sees of ``obj.name`` (None: not inspectable, so not checked)."""
    try:
        if is_class:
            raw = inspect.getattr_static(obj, name)
            if isinstance(raw, staticmethod):
                return inspect.signature(raw.__func__)
            if isinstance(raw, classmethod):
                params = list(inspect.signature(raw.__func__).parameters.values())[1:]
                return inspect.Signature(params)
            if inspect.isfunction(raw):
                params = list(inspect.signature(raw).parameters.values())[1:]
                return inspect.Signature(params)
            return None
        return inspect.signature(getattr(obj, name))
    except (TypeError, ValueError, AttributeError):
        return None


def _accepts(sig: inspect.Signature, wanted: inspect.Signature) -> list[str]:
    """What a call shaped like ``wanted`` (its positional parameters by position, its
    keyword-only ones by name) would pass that ``sig`` cannot take."""
    params = list(sig.parameters.values())
    kinds = {p.kind for p in params}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    want_pos = [p for p in wanted.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    want_kw = [p.name for p in wanted.parameters.values() if p.kind is p.KEYWORD_ONLY]
    least = sum(1 for p in want_pos if p.default is p.empty)       # positional arguments always passed
    problems = []
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(positional) < len(want_pos):
        problems.append(f"takes fewer than the {len(want_pos)} positional arguments callers may pass")
    if sum(1 for p in positional if p.default is p.empty) > least:
        problems.append(f"requires more than the {least} positional arguments callers pass")
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        problems += [f"does not accept keyword {k}=" for k in want_kw if k not in names]
    problems += [f"requires keyword {p.name}=, which callers never pass" for p in params
                 if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in want_kw]
    return problems


def _has(obj: Any, name: str) -> bool:
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        return hasattr(obj, name)   # nn.Module keeps submodules and parameters outside __dict__


def contract_problems(family: str, obj: Any) -> list[str]:
    """What ``obj`` (a component, or a class of components) lacks of its family's contract:
    ["missing transform()", "forward() does not accept keyword tiles_per_batch=", ...]; [] when it
    conforms or the family has no contract. A class is checked for its methods only (its data
    attributes are set when an instance is made)."""
    protocol = CONTRACTS.get(family)
    if protocol is None:
        return []
    is_class = inspect.isclass(obj)
    methods, attributes = contract_members(protocol)
    problems = []
    for name, wanted in methods.items():
        if not _has(obj, name):
            problems.append(f"missing {name}()")
            continue
        sig = _callable_signature(obj, name, is_class)
        if sig is not None:
            problems += [f"{name}() {what}" for what in _accepts(sig, wanted)]
    if not is_class:
        problems += [f"missing attribute {name}" for name in attributes if not _has(obj, name)]
    return problems
