"""Batching for training: a length-grouped distributed batch plan and the collate function.

    plan = LengthGroupedPlan(ds.lengths, micro_batch=8, world_size=2, rank=0, seed=0)
    plan.steps_per_epoch                 # global batches (all ranks together) per epoch
    plan.indices(batch_number)           # this rank's sample indices of global batch k (k >= 0,
                                         # across epochs: deterministic, so a resume just skips)
    plan.rows(batch_number)              # the same, one row per sample (jobs/train/packing.py's
                                         # PackedPlan gives several samples a row)
    batch = collate([ds[i] for i in plan.indices(k)], pad_id=tok.pad_token_id)

Length grouping (like LLaVA's / HF's grouped sampler): each epoch is a seeded permutation cut
into mega-chunks of ``mega`` global batches; inside a chunk samples are sorted by length and cut
into global batches, and global batch members are dealt to ranks round-robin, so every rank gets
samples of nearly the same length and little padding. Batch order is shuffled again.
"""
from __future__ import annotations

from typing import Sequence

IGNORE_INDEX = -100


class LengthGroupedPlan:
    def __init__(self, lengths: Sequence[int], micro_batch: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, group_by_length: bool = True, mega: int = 16):
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch plan: micro_batch={micro_batch} world_size={world_size} rank={rank}")
        self.lengths = list(lengths)
        self.micro_batch, self.world_size, self.rank = micro_batch, world_size, rank
        self.seed, self.group_by_length, self.mega = seed, group_by_length, max(1, mega)
        self.global_batch = micro_batch * world_size
        if len(self.lengths) < self.global_batch:
            raise ValueError(f"{len(self.lengths)} samples cannot fill one global batch of "
                             f"{self.global_batch} (micro_batch {micro_batch} x {world_size} workers)")
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch`` (each a list of world_size * micro_batch indices)."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        import numpy as np

        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.global_batch]
        lengths = np.asarray(self.lengths)
        batches = []
        chunk = self.global_batch * self.mega
        for a in range(0, len(order), chunk):
            part = order[a:a + chunk]
            if self.group_by_length:
                part = part[np.argsort(-lengths[part], kind="stable")]
            batches += [part[b:b + self.global_batch].tolist() for b in range(0, len(part), self.global_batch)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def indices(self, batch_number: int) -> list[int]:
        """This rank's share of global batch ``batch_number`` (counted across epochs)."""
        epoch, k = divmod(batch_number, self.steps_per_epoch)
        members = self.global_batches(epoch)[k]
        return members[self.rank::self.world_size]

    def rows(self, batch_number: int) -> list[list[int]]:
        return [[i] for i in self.indices(batch_number)]


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad token ids / labels of a micro-batch; images stay a list of [K_i,3,B,B] tensors
    in sample order (one per <image> sentinel, as BlueLMV.forward expects)."""
    import torch

    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)          # [B, L]
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(items), longest), dtype=torch.long)                 # [B, L]
    images = []
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(it["labels"], dtype=torch.long)
        mask[b, :n] = 1
        images.extend(it["images"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images,
            "lengths": [int(it["length"]) for it in items], "llm_tokens": int(sum(it["length"] for it in items)),
            "crops": sum(int(im.shape[0]) for im in images)}
