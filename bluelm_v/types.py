"""Small typed records the stages share (stages never import each other)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass
class CaseResult:
    """One benchmark case on one device (backends fill in what they measure)."""

    device: str
    case: dict
    status: str = "ok"
    metrics: dict = field(default_factory=dict)
    error: str | None = None
