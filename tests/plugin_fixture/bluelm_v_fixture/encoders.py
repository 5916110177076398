"""encoder ``patch_embed``: a linear patch embedding, [K,3,B,B] -> [K,(B/patch)^2,hidden_size]."""
from bluelm_v import hookimpl


def patch_embed(image_size: int = 384, patch: int = 32, hidden_size: int = 32,
                tiles_per_batch: int = 4, seed: int = 0):
    """A ViT's patch embedding without the transformer layers (random init, seeded)."""
    import torch

    class PatchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if image_size % patch:
                raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
            self.image_size, self.hidden_size = image_size, hidden_size       # contract attributes
            self.num_tokens = (image_size // patch) ** 2                      # T tokens per crop
            self.tiles_per_batch = tiles_per_batch
            gen = torch.Generator().manual_seed(seed)
            self.proj = torch.nn.Linear(3 * patch * patch, hidden_size)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) * 0.02)

        def forward(self, pixels, tiles_per_batch=None, pipelined=None):
            """pixels [K,3,B,B] -> [K,T,C], ``tiles_per_batch`` crops per call (None: the
            configured value); ``pipelined`` has nothing to overlap here."""
            step = tiles_per_batch or self.tiles_per_batch
            return torch.cat([self._embed(pixels[i:i + step]) for i in range(0, pixels.shape[0], step)])

        def _embed(self, x):
            k = x.shape[0]
            x = x.unfold(2, patch, patch).unfold(3, patch, patch)            # [k,3,B/p,B/p,p,p]
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(k, self.num_tokens, -1)  # [k,T,3*p*p]
            return self.proj(x)                                              # [k,T,C]

    return PatchEmbed()


@hookimpl
def bluelm_v_register(registry):
    registry.encoder.register("patch_embed", patch_embed, description="linear patch embedding (no layers)",
                              ranges={"patch": (1, None), "hidden_size": (1, None), "tiles_per_batch": (1, None)})
