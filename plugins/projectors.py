"""Projectors: visual tokens -> the LLM's embedding space.

    projector: {name: mlp2x_gelu, layer_norm: true}

``mlp2x_gelu``: [LayerNorm(in_dim)] -> Linear(in_dim, D) -> GELU -> Linear(D, D) (docs/design.md §1;
the LayerNorm is a design choice, docs/design.md §1, on by default). Linear weights start N(0, init_std = 0.02),
biases 0, as transformers initialises new LLM layers, so untrained visual tokens have the scale
of text embeddings. The framework passes ``in_dim`` (the
downsampler's out_dim) and ``out_dim`` (the LLM's hidden size).
"""
from __future__ import annotations

from bluelm_v import hookimpl


def mlp2x_gelu(in_dim: int, out_dim: int, layer_norm: bool = True, hidden_dim: int | None = None,
               dtype: str = "float32", init_std: float = 0.02, seed: int = 0):
    """2-layer MLP with GELU (LLaVA's mlp2x_gelu), optional LayerNorm in front."""
    import torch

    hidden = hidden_dim or out_dim
    layers = [torch.nn.LayerNorm(in_dim)] if layer_norm else []
    layers += [torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out_dim)]
    mlp = torch.nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # N(0, init_std) like the LLM's own init: visual tokens start at text scale
        for m in mlp:       # (nothing to fill on the meta device: a loader assigns the weights)
            if isinstance(m, torch.nn.Linear) and not m.weight.is_meta:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * init_std)
                m.bias.zero_()
    mlp.in_dim, mlp.out_dim = in_dim, out_dim
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return mlp.to(dt)


@hookimpl
def bluelm_v_register(registry):
    registry.projector.register("mlp2x_gelu", mlp2x_gelu, ranges={"hidden_dim": (1, None), "init_std": (0, None)},
                                choices={"dtype": ("float32", "bfloat16", "float16")})
