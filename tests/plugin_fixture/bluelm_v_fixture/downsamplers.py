"""downsampler ``token_pool``: the mean of each run of ``window`` tokens, [K,T,C] -> [K,ceil(T/w),C]."""
from bluelm_v import hookimpl


def token_pool(in_dim: int, window: int = 4):
    """``in_dim`` is wired by the model (the encoder's hidden_size)."""
    import torch

    class TokenPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.window, self.out_dim = window, in_dim          # out_dim: the projector's in_dim

        def out_tokens(self, tokens: int) -> int:
            return -(-tokens // self.window)

        def forward(self, x):                                    # [K,T,C]
            k, t, c = x.shape
            pad = self.out_tokens(t) * self.window - t
            if pad:
                x = torch.cat([x, x[:, -1:].expand(k, pad, c)], 1)   # repeat the last token
            return x.reshape(k, -1, self.window, c).mean(2)     # [K,T',C]

    return TokenPool()


@hookimpl
def bluelm_v_register(registry):
    registry.downsampler.register("token_pool", token_pool, description="mean of each run of `window` tokens",
                                  ranges={"window": (1, None)})
