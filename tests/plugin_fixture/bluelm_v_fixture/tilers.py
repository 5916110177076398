"""tiler ``square``: every image becomes one square crop (grid 1:1), no thumbnail."""
from bluelm_v import hookimpl


class SquareTiler:
    """always one 384 tile"""

    def __init__(self, tile_size: int = 384):
        self.tile_size = tile_size                  # px; must equal the encoder's image_size

    def select(self, width: int, height: int) -> tuple[int, int]:
        return 1, 1                                 # (m columns along the width, n rows)

    def select_many(self, widths, heights):
        """Vectorised select: numpy int arrays (ms, ns), one entry per size."""
        import numpy as np

        ones = np.ones(len(widths), dtype=np.int64)
        return ones, ones.copy()

    def num_crops(self, m, n):
        """Crops for grid (m, n), thumbnail included (none here); works on numpy arrays too."""
        return m * n

    def degenerate_many(self, widths, heights):
        """Sizes no grid of this tiler holds (none: every size fits one squashed tile)."""
        import numpy as np

        return np.zeros(len(widths), dtype=bool)

    def transform(self, image):
        """PIL image -> Crops: pixels [1, 3, B, B] in [-1, 1] (the encoder's normalisation)."""
        import numpy as np
        import torch

        from bluelm_v.types import Crops, Grid

        rgb = image.convert("RGB").resize((self.tile_size, self.tile_size))
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)   # [B, B, 3]
        pixels = pixels.permute(2, 0, 1)[None].contiguous()                         # [1, 3, B, B]
        return Crops(pixels=pixels, grid=Grid(1, 1), n_crops=1, thumbnail_index=None,
                     image_size=(image.width, image.height))


@hookimpl
def bluelm_v_register(registry):
    registry.tiler.register("square", SquareTiler, description="always one 384 tile",
                            ranges={"tile_size": (14, 4096)})
