"""Token downsamplers between the vision encoder and the projector.

    downsampler: {name: vila_2x2}        # [K,729,C] -> [K,196,4C]  (docs/design.md §1)
    downsampler: {name: identity}        # [K,T,C] unchanged

``vila_2x2``: reshape the T = s*s tokens to an s x s grid, zero-pad the FEATURES to an even
side (27 -> 28), concatenate each 2x2 block (top-left, top-right, bottom-left, bottom-right)
into one token of 4C, emitted row-major (``order: column_major`` emits VILA's column-major
order instead). The framework passes ``in_dim`` (the encoder's hidden size).
"""
from __future__ import annotations

import math

from bluelm_v import hookimpl


def _modules():
    import torch

    class Vila2x2(torch.nn.Module):
        """2x2 token merge: [K, s*s, C] -> [K, ceil(s/2)^2, 4C]."""

        def __init__(self, in_dim: int, order: str = "row_major"):
            super().__init__()
            self.in_dim, self.out_dim, self.order = in_dim, 4 * in_dim, order

        @staticmethod
        def out_tokens(tokens: int) -> int:
            side = math.isqrt(tokens)
            return ((side + 1) // 2) ** 2

        def forward(self, x):
            k, t, c = x.shape                                   # [K, T, C]
            side = math.isqrt(t)
            if side * side != t:
                raise ValueError(f"vila_2x2 needs a square token grid, got {t} tokens")
            grid = x.reshape(k, side, side, c)                  # [K, s, s, C]
            if side % 2:
                grid = torch.nn.functional.pad(grid, (0, 0, 0, 1, 0, 1))  # [K, s+1, s+1, C]
            h = grid.shape[1] // 2
            blocks = grid.reshape(k, h, 2, h, 2, c).permute(0, 1, 3, 2, 4, 5)  # [K,h,h,2,2,C]
            if self.order == "column_major":
                blocks = blocks.transpose(1, 2)
            return blocks.reshape(k, h * h, 4 * c)              # [K, h*h, 4C]

    class Identity(torch.nn.Module):
        """No merge: [K, T, C] -> [K, T, C]."""

        def __init__(self, in_dim: int):
            super().__init__()
            self.in_dim = self.out_dim = in_dim

        @staticmethod
        def out_tokens(tokens: int) -> int:
            return tokens

        def forward(self, x):
            return x

    return Vila2x2, Identity


def vila_2x2(in_dim: int, order: str = "row_major"):
    """VILA 2x2 token merge: 729 tokens -> pad 28x28 -> 196 tokens of 4*C."""
    return _modules()[0](in_dim=in_dim, order=order)


def identity(in_dim: int):
    """No downsampling: the encoder's tokens go to the projector unchanged."""
    return _modules()[1](in_dim=in_dim)


@hookimpl
def bluelm_v_register(registry):
    registry.downsampler.register("vila_2x2", vila_2x2, choices={"order": ("row_major", "column_major")})
    registry.downsampler.register("identity", identity)
