"""engine ``recompute``: keeps the sequence's embeddings and runs the whole sequence through the
causal LM's forward for every chunk and every new token (no KV cache; any causal LM)."""
from bluelm_v import hookimpl


class RecomputeEngine:
    name = "recompute"
    decode_chunk = 1                                     # tokens the runtime asks of steps() at a time

    def __init__(self, model):
        self.model = model                               # the causal LM (llm.model), wired by the runtime
        self.embeds = None                               # [1, length, D]
        self.length = 0

    def begin(self, max_len: int) -> None:
        """A new sequence of at most ``max_len`` positions."""
        self.max_len, self.embeds, self.length = max_len, None, 0

    def prefill(self, embeds, chunk: int):
        """[1,L,D] embeddings, ``chunk`` positions per forward -> [V] logits of the last one."""
        logits = None
        for start in range(0, embeds.shape[1], chunk):
            logits = self._extend(embeds[:, start:start + chunk])
        return logits

    def step(self, token: int) -> int:
        """One greedy decode step: append ``token``, return the next one."""
        import torch

        emb = self.model.get_input_embeddings()(torch.tensor([[token]], device=self.device))
        return int(self._extend(emb).argmax())

    def steps(self, token: int, n: int) -> list[int]:
        out = []
        for _ in range(n):
            token = self.step(token)
            out.append(token)
        return out

    def _extend(self, new):
        import torch

        with torch.no_grad():
            self.embeds = new if self.embeds is None else torch.cat([self.embeds, new], 1)
            self.length = self.embeds.shape[1]
            return self.model(inputs_embeds=self.embeds).logits[0, -1].float()       # [V]

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def cache_bytes(self) -> int:
        return 0 if self.embeds is None else self.embeds.numel() * self.embeds.element_size()


def recompute(model):
    """``model`` is wired by the runtime (the LLM's causal LM); the engine node has no parameters."""
    return RecomputeEngine(model)


@hookimpl
def bluelm_v_register(registry):
    registry.engine.register("recompute", recompute, description="no KV cache: the whole sequence every step")
