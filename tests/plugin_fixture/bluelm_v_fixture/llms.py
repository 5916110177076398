"""llm ``bag_lm``: a causal LM whose every position sees the running mean of the positions so
far (no attention, no KV cache), with bluelm-v's byte tokenizer. Random init, seeded."""
from bluelm_v import hookimpl


def bag_lm(hidden_size: int = 32, max_context: int = 4096, seed: int = 0):
    import types

    import torch
    import torch.nn.functional as F

    from bluelm_v.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()

    class BagCausalLM(torch.nn.Module):
        """The causal LM (``llm.model``): forward(inputs_embeds=...) -> .logits [B,L,V], .loss."""

        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=hidden_size, vocab_size=tokenizer.vocab_size,
                                                model_type="bag_lm", max_position_embeddings=max_context)
            gen = torch.Generator().manual_seed(seed)
            self.embed_tokens = torch.nn.Embedding(tokenizer.vocab_size, hidden_size)
            self.mix = torch.nn.Linear(hidden_size, hidden_size)
            self.lm_head = torch.nn.Linear(hidden_size, tokenizer.vocab_size, bias=False)
            with torch.no_grad():
                for p in (self.embed_tokens.weight, self.mix.weight, self.lm_head.weight):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

        def get_input_embeddings(self):
            return self.embed_tokens

        def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, **unused):
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds     # [B,L,D]
            count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
            h = torch.tanh(self.mix(x.cumsum(1) / count)) + x                                # [B,L,D]
            logits = self.lm_head(h)                                                         # [B,L,V]
            loss = None
            if labels is not None:                      # next-token loss, -100 ignored
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       labels[:, 1:].reshape(-1), ignore_index=-100)
            return types.SimpleNamespace(logits=logits, loss=loss)

    class BagLM(torch.nn.Module):
        """The contract object: .model, .tokenizer, .hidden_size, .max_context, .eos_token_ids, .embed."""

        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = BagCausalLM(), tokenizer
            self.hidden_size, self.max_context = hidden_size, max_context

        @property
        def eos_token_ids(self) -> set[int]:
            return {tokenizer.eos_token_id}

        def embed(self, input_ids):                     # [B,L] -> [B,L,D]
            return self.model.get_input_embeddings()(input_ids)

    return BagLM().eval()


@hookimpl
def bluelm_v_register(registry):
    registry.llm.register("bag_lm", bag_lm, description="causal running-mean LM, byte tokenizer (tests)",
                          ranges={"hidden_size": (1, None), "max_context": (16, None)})
