"""Sequence packing (docs/design.md §9): whole samples packed first-fit into rows of ``max_seq``
LLM tokens (text + visual, spliced lengths known before any image is decoded), each row's samples
kept apart by document-masked attention with positions restarting per sample
(jobs/train/decoder.py).

    bins = first_fit(lengths, capacity=4096)                   # lists of sample indices
    plan = PackedPlan(lengths, max_seq=4096, micro_batch=4, world_size=8, rank=r, seed=0, longest_first=True)
    plan.steps_per_epoch                  # global batches (micro_batch * world_size rows) per epoch
    plan.rows(k)                          # this rank's rows of global batch k: lists of sample indices
    batch = collate_packed([[ds[i] for i in row] for row in plan.rows(k)], pad_id, 4096, 196)

Packing runs once, offline, over a seeded permutation of all samples in windows of ``window``
samples: each sample goes into the first row of its window it fits (first fit), taken longest
first when ``longest_first`` (first-fit decreasing: within a few percent of the fewest rows
possible; on the synthetic LLaVA-like mix of jobs/train/mix.py, 4096-token rows are 97.5% full
against 94.8% in the shuffled order) or in the shuffled order (rows mix lengths, and with them
whatever correlates with length, such as the task). The rows of every window together are the
epoch's units, reshuffled each epoch and dealt to ranks round-robin, so every rank gets about
``max_seq`` tokens per row. A sample longer than ``max_seq`` cannot be packed
(the data path skips it as too_long when ``data.max_length <= max_seq``).
"""
from __future__ import annotations

from typing import Sequence

from bluelm_v.chat import IGNORE_INDEX, IMAGE_TOKEN_ID


def first_fit(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None,
              longest_first: bool = True) -> list[list[int]]:
    """Indices (of ``order``, default all, in that order or longest first) packed into bins of
    ``capacity``, each into the first open bin with room. ValueError for a length above ``capacity``."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    idx = np.arange(len(lengths)) if order is None else np.asarray(order, dtype=np.int64)
    if len(idx) and int(lengths[idx].max()) > capacity:
        i = int(idx[np.argmax(lengths[idx])])
        raise ValueError(f"sample {i}: {int(lengths[i])} tokens do not fit a packed row of {capacity}")
    if longest_first:
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
    room = np.empty(0, dtype=np.int64)                  # free tokens of each open bin
    bins: list[list[int]] = []
    for i in idx.tolist():
        n = int(lengths[i])
        fits = np.flatnonzero(room >= n)
        if len(fits):
            j = int(fits[0])
            room[j] -= n
            bins[j].append(i)
        else:
            room = np.append(room, capacity - n)
            bins.append([i])
    return bins


class PackedPlan:
    """Rows of packed samples as the distributed batch plan (the interface of
    jobs.train.data.LengthGroupedPlan: ``steps_per_epoch``, ``rows(k)``, ``indices(k)``)."""

    def __init__(self, lengths: Sequence[int], max_seq: int, micro_batch: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, window: int = 4096, longest_first: bool = True):
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch plan: micro_batch={micro_batch} world_size={world_size} rank={rank}")
        import numpy as np

        self.lengths = list(lengths)
        self.max_seq, self.micro_batch, self.world_size, self.rank, self.seed = (
            int(max_seq), micro_batch, world_size, rank, seed)
        self.global_batch = micro_batch * world_size
        order = np.random.default_rng([seed, 1 << 20]).permutation(len(self.lengths))
        self.bins: list[list[int]] = []
        for a in range(0, len(order), max(1, window)):
            self.bins += first_fit(self.lengths, self.max_seq, order[a:a + window], longest_first)
        if len(self.bins) < self.global_batch:
            raise ValueError(f"{len(self.lengths)} samples pack into {len(self.bins)} rows of {max_seq} tokens: "
                             f"too few for one global batch of {self.global_batch} rows "
                             f"(micro_batch {micro_batch} x {world_size} workers)")
        self._epoch_cache: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.bins) // self.global_batch

    @property
    def fill(self) -> float:
        """Real tokens / row capacity over all rows (1.0 = no padding at all)."""
        return sum(self.lengths) / (len(self.bins) * self.max_seq)

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        import numpy as np

        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.bins)).tolist()
        self._epoch_cache = (epoch, order)
        return order

    def rows(self, batch_number: int) -> list[list[int]]:
        """This rank's rows of global batch ``batch_number`` (counted across epochs)."""
        epoch, k = divmod(batch_number, self.steps_per_epoch)
        members = self._order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        return [self.bins[b] for b in members[self.rank::self.world_size]]

    def indices(self, batch_number: int) -> list[int]:
        return [i for row in self.rows(batch_number) for i in row]


def spliced_length(item: dict, tokens_per_crop: int) -> int:
    """LLM tokens of a loaded sample after its <image> sentinels become visual tokens."""
    sentinels = sum(1 for t in item["input_ids"] if t == IMAGE_TOKEN_ID)
    return len(item["input_ids"]) - sentinels + sum(int(im.shape[0]) for im in item["images"]) * tokens_per_crop


def collate_packed(rows: list[list[dict]], pad_id: int, max_seq: int, tokens_per_crop: int) -> dict:
    """Rows of loaded samples -> one packed micro-batch. Each row's token ids and labels are its
    samples' concatenated (right-padded to the longest row, mask 0); the first label of every
    sample is -100 so no sample learns to predict its neighbour. ``doc_lens`` holds, per row,
    the spliced length of each sample and then of the padding up to ``max_seq`` (the train step
    pads every spliced row to ``max_seq``: one shape for every micro-batch)."""
    import torch

    ids_rows, label_rows, images, doc_lens, lengths = [], [], [], [], []
    for r, row in enumerate(rows):
        ids, labels, docs = [], [], []
        for it in row:
            n = spliced_length(it, tokens_per_crop)
            ids += list(it["input_ids"])
            labels += [IGNORE_INDEX] + list(it["labels"][1:])
            images.extend(it["images"])
            docs.append(n)
            lengths.append(n)
        if sum(docs) > max_seq:
            raise ValueError(f"packed row {r}: {sum(docs)} tokens exceed max_seq {max_seq} "
                             f"(sample lengths {docs})")
        if sum(docs) < max_seq:
            docs.append(max_seq - sum(docs))
        ids_rows.append(ids)
        label_rows.append(labels)
        doc_lens.append(docs)
    width = max(len(x) for x in ids_rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)          # [B, T]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)       # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)                       # [B, T]
    for b, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "images": images,
            "doc_lens": doc_lens, "lengths": lengths, "llm_tokens": int(sum(lengths)),
            "crops": sum(int(im.shape[0]) for im in images)}
