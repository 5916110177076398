"""Image splicing, planned on the host: which row of text embeddings or visual tokens each
position of the spliced sequence takes, then one gather on the device (``BlueLMV.splice`` and
the train step both use it; planning reads no device tensor, so a GPU step never waits on it).

    plan = SplicePlan.build(input_ids_cpu, attention_mask_cpu, labels_cpu, [n_tokens_of_image_i, ...])
    embeds = plan.embeds(text_embeds, visual_tokens)     # [B, L', D] on the device: one gather
    plan.attention_mask, plan.labels                      # [B, L'] (CPU tensors; move them as needed)

Row b of the result is row b of ``input_ids`` with each IMAGE_TOKEN_ID replaced by the next image's
visual tokens (labels -100 there, mask = the sentinel's mask value), right-padded with zero
embeddings, mask 0 and label -100 to the longest row.
"""
from __future__ import annotations

from dataclasses import dataclass

from .chat import IGNORE_INDEX, IMAGE_TOKEN_ID
from .errors import InputError


@dataclass
class SplicePlan:
    index: "object"            # [B, L'] long: rows of cat([text [B*L, D], visual [sum N, D], zero [1, D]])
    attention_mask: "object"   # [B, L']
    labels: "object"           # [B, L'] or None
    right_padded: bool         # every mask row is ones then zeros

    @classmethod
    def build(cls, input_ids, attention_mask, labels, image_tokens: list[int]) -> "SplicePlan":
        """``input_ids``, ``attention_mask``, ``labels``: CPU [B, L] (mask/labels may be None);
        ``image_tokens``: visual tokens of each image, in sentinel order."""
        import torch

        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        b_rows, length = ids.shape
        hits = ids == IMAGE_TOKEN_ID                                          # [B, L]
        if int(hits.sum()) != len(image_tokens):
            raise InputError(f"input_ids: {int(hits.sum())} <image> placeholder(s) but {len(image_tokens)} "
                             f"image(s) given")
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        text_rows, vis_start = b_rows * length, torch.tensor([0, *image_tokens]).cumsum(0).tolist()
        zero_row = text_rows + vis_start[-1]
        rows_i, rows_m, rows_l, k = [], [], [], 0
        for b in range(b_rows):
            pieces_i, pieces_m, pieces_l, start = [], [], [], 0
            for pos in hits[b].nonzero().flatten().tolist() + [length]:
                pieces_i.append(torch.arange(b * length + start, b * length + pos))
                pieces_m.append(mask[b, start:pos])
                if labels is not None:
                    pieces_l.append(labels[b, start:pos])
                if pos < length:
                    n = image_tokens[k]
                    pieces_i.append(torch.arange(text_rows + vis_start[k], text_rows + vis_start[k] + n))
                    pieces_m.append(mask.new_full((n,), int(mask[b, pos])))
                    if labels is not None:
                        pieces_l.append(labels.new_full((n,), IGNORE_INDEX))
                    k += 1
                start = pos + 1
            rows_i.append(torch.cat(pieces_i))
            rows_m.append(torch.cat(pieces_m))
            if labels is not None:
                rows_l.append(torch.cat(pieces_l))
        longest = max(r.shape[0] for r in rows_i)
        index = torch.full((b_rows, longest), zero_row, dtype=torch.long)     # [B, L']
        out_mask = mask.new_zeros(b_rows, longest)
        out_labels = labels.new_full((b_rows, longest), IGNORE_INDEX) if labels is not None else None
        for b, row in enumerate(rows_i):
            index[b, :row.shape[0]] = row
            out_mask[b, :row.shape[0]] = rows_m[b]
            if out_labels is not None:
                out_labels[b, :row.shape[0]] = rows_l[b]
        return cls(index, out_mask, out_labels, right_padded(out_mask))

    def embeds(self, text, visual):
        """text [B, L, D] (embeddings of the ids), visual [sum N, D] -> [B, L', D] (one gather)."""
        import torch

        d = text.shape[-1]
        src = torch.cat([text.reshape(-1, d), visual.to(text.dtype), text.new_zeros(1, d)])  # [B*L + N + 1, D]
        index = to_device(self.index, text.device)
        return src[index]                                                   # [B, L', D]


def right_padded(mask) -> bool:
    """True when every row of a [B, L] 0/1 mask is ones then zeros (or has no zeros)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def to_device(t, device):
    """Host tensor -> ``device`` without a stream synchronisation (pinned, non-blocking) on CUDA."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
