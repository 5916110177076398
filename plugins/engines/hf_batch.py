"""Batched prefill and greedy decode for the ``hf`` engine: the transformers model's own forward
on left-padded rows with an attention mask, per-row position ids and one DynamicCache.

    eng.begin_batch(rows, max_len); logits = eng.prefill_batch(embeds, chunk)     # [rows, V]
    toks = eng.steps_batch(rows, tokens, n)          # rows left out: dropped from the cache

Rows of different lengths are padded on the left to the longest (masked, positions counted
from each row's first real token), so every row's next position is the same cache column.
Finished rows are dropped from the cache (``DynamicCache.batch_select_indices``), the mask and
the positions: the remaining rows' steps no longer compute them.
"""
from __future__ import annotations

import torch

from bluelm_v.nn.kv_cache import cache_nbytes


class HFBatch:
    """Batched sequences over one HFEngine's model (see the module docstring)."""

    def __init__(self, eng):
        self.eng = eng
        self.cache = None

    def begin(self, rows: int, max_len: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.eng.model.config)
        self.rows, self.capacity = rows, max_len
        self.live: list[int] = list(range(rows))

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self.cache)

    @torch.no_grad()
    def prefill(self, embeds: list, chunk: int) -> torch.Tensor:
        """embeds[r] [1,L_r,D] -> [rows, V] fp32 logits of each row's last position."""
        model, device = self.eng.model, self.eng.device
        lengths = [int(e.shape[1]) for e in embeds]
        width, dim = max(lengths), embeds[0].shape[-1]
        x = torch.zeros(len(embeds), width, dim, dtype=embeds[0].dtype, device=device)   # [B,L,D]
        mask = torch.zeros(len(embeds), width, dtype=torch.long, device=device)         # [B,L]
        for r, e in enumerate(embeds):
            x[r, width - lengths[r]:] = e[0].to(device)
            mask[r, width - lengths[r]:] = 1
        positions = (mask.cumsum(1) - 1).clamp_(min=0)                                   # [B,L]
        out = None
        for start in range(0, width, chunk):
            end = min(width, start + chunk)
            out = model(inputs_embeds=x[:, start:end], attention_mask=mask[:, :end],
                        position_ids=positions[:, start:end], past_key_values=self.cache, use_cache=True,
                        cache_position=torch.arange(start, end, device=device), logits_to_keep=1)
        self.mask, self.next_pos = mask, torch.tensor(lengths, device=device)
        self.lengths = lengths
        return out.logits[:, -1].float()

    @torch.no_grad()
    def steps(self, rows: list[int], tokens: list[int], n: int) -> list[list[int]]:
        """n greedy tokens for each of ``rows`` (fed ``tokens``); rows left out are dropped."""
        if not rows or n < 1:
            return [[] for _ in rows]
        if rows != self.live:
            keep = torch.tensor([self.live.index(r) for r in rows], device=self.eng.device)
            self.cache.batch_select_indices(keep)
            self.mask, self.next_pos, self.live = self.mask[keep], self.next_pos[keep], list(rows)
        model, device = self.eng.model, self.eng.device
        tok = torch.tensor(tokens, device=device)[:, None]                             # [b,1]
        made = []
        for _ in range(n):
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], 1)
            col = self.mask.shape[1] - 1
            out = model(inputs_embeds=model.get_input_embeddings()(tok), attention_mask=self.mask,
                        position_ids=self.next_pos[:, None], past_key_values=self.cache, use_cache=True,
                        cache_position=torch.tensor([col], device=device), logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)                           # [b,1]
            made.append(tok)
            self.next_pos = self.next_pos + 1
        for r in rows:
            self.lengths[r] += n
        return torch.cat(made, 1).tolist()
