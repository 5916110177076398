"""projector ``linear``: one nn.Linear from the downsampler's width to the LLM's."""
from bluelm_v import hookimpl


def linear(in_dim: int, out_dim: int, bias: bool = True):
    """``in_dim`` (downsampler.out_dim) and ``out_dim`` (llm.hidden_size) are wired by the model."""
    import torch

    return torch.nn.Linear(in_dim, out_dim, bias=bias)      # [N, in_dim] -> [N, out_dim]


@hookimpl
def bluelm_v_register(registry):
    registry.projector.register("linear", linear, description="one linear layer")
