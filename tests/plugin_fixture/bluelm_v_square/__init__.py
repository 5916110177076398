"""A third-party tiler: always one square tile, no thumbnail (the README's plugin example)."""
from bluelm_v import hookimpl


class SquareTiler:
    """always one 384 tile"""

    def __init__(self, tile_size: int = 384):
        self.tile_size = tile_size

    def select(self, width, height):
        return 1, 1

    def select_many(self, widths, heights):
        import numpy as np
        ones = np.ones(len(widths), dtype=np.int64)
        return ones, ones.copy()

    def num_crops(self, m, n):
        return m * n


@hookimpl
def bluelm_v_register(registry):
    registry.tiler.register("square", SquareTiler, description="always one 384 tile",
                            ranges={"tile_size": (14, 4096)})
