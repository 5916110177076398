"""Length distributions to measure training speed on (docs/design.md §9; bench/bench_train_gpu.py).

    mix = synthetic_mix(4096, tiler, tokens_per_crop=196, max_length=4096, seed=0)
    mix = llava_mix("llava_v1_5_mix665k.json", "images/", tiler, tokenizer, 196, max_length=4096)
    mix.lengths, mix.text, mix.crops, mix.answer        # numpy int arrays, one entry per sample
    mix.describe()                                      # counts, text-only share, length percentiles

``synthetic_mix`` is the documented stand-in for LLaVA-1.5's 665k instruction mix when the data
is not at hand:
- 6.1% of the samples are text-only (40,688 of 665,298 in the 665k mix, bluelm_v.data.manifest);
- every other sample has one image whose size is drawn from the 118,287 embedded COCO train2017
  sizes (COCO is 58% of the mix's images) and whose crop count is the tiler's decision for that
  size (196 visual tokens per crop with so400m + the 2x2 merge);
- text tokens (chat template included) are log-normal: median 180, sigma 0.7 for image samples
  (short VQA answers in multi-turn groups, conversations, descriptions) and median 700, sigma 0.8
  for text-only ones (ShareGPT conversations), clipped to [16, max_length - visual tokens];
- the assistant's share of the text (the loss tokens) is the last 40%.
These text figures are stated assumptions, not measurements; ``llava_mix`` measures the real file
(header sizes and token counts, no image decoded) when a user points to it.
"""
from __future__ import annotations

from dataclasses import dataclass

TEXT_ONLY_SHARE = 40_688 / 665_298
IMAGE_TEXT = (180.0, 0.7)          # log-normal (median, sigma) of text tokens, image samples
TEXT_ONLY_TEXT = (700.0, 0.8)      # the same, text-only samples
ANSWER_SHARE = 0.4


@dataclass
class LengthMix:
    name: str
    text: "object"        # [N] text tokens (without image sentinels)
    crops: "object"       # [N] crops (0: text-only)
    answer: "object"      # [N] loss tokens (the last ``answer`` text tokens)
    tokens_per_crop: int

    @property
    def lengths(self):
        return self.text + self.crops * self.tokens_per_crop

    def describe(self) -> dict:
        import numpy as np

        n = self.lengths
        return {"name": self.name, "samples": int(len(n)), "text_only": round(float((self.crops == 0).mean()), 4),
                "mean_tokens": round(float(n.mean()), 1), "mean_crops": round(float(self.crops.mean()), 3),
                "p10_50_90_max": [int(x) for x in np.percentile(n, [10, 50, 90, 100])]}


def synthetic_mix(n: int, tiler, tokens_per_crop: int = 196, max_length: int = 4096, seed: int = 0) -> LengthMix:
    """``n`` samples of the stated mix (module docstring), crops from ``tiler`` on COCO sizes."""
    import numpy as np

    from bluelm_v.data.manifest import read_size_manifest

    rng = np.random.default_rng(seed)
    sizes = read_size_manifest()
    text_only = rng.random(n) < TEXT_ONLY_SHARE
    pick = rng.integers(0, len(sizes), n)
    m, g = tiler.select_many(sizes["width"].to_numpy()[pick], sizes["height"].to_numpy()[pick])
    crops = np.where(text_only, 0, np.asarray(tiler.num_crops(m, g), dtype=np.int64))
    median = np.where(text_only, TEXT_ONLY_TEXT[0], IMAGE_TEXT[0])
    sigma = np.where(text_only, TEXT_ONLY_TEXT[1], IMAGE_TEXT[1])
    text = np.round(median * np.exp(sigma * rng.standard_normal(n))).astype(np.int64)
    room = max_length - crops * tokens_per_crop
    if (room < 16).any():
        raise ValueError(f"max_length {max_length} leaves no room for text after {int(crops.max())} crops")
    text = np.clip(text, 16, room)
    answer = np.maximum(1, np.round(text * ANSWER_SHARE)).astype(np.int64)
    return LengthMix("synthetic LLaVA-665k-like", text, crops, answer, tokens_per_crop)


def llava_mix(json_path, image_root, tiler, tokenizer, tokens_per_crop: int = 196, max_length: int = 4096,
              cache_dir=None, max_samples: int | None = None) -> LengthMix:
    """The lengths of a real LLaVA-format file (bluelm_v.data.llava's scan: no image decoded)."""
    from bluelm_v.data.llava import LlavaDataset

    ds = LlavaDataset(json_path, image_root, tiler, tokenizer, tokens_per_crop, max_length=max_length,
                      max_samples=max_samples, cache_dir=cache_dir)
    return LengthMix(str(json_path), ds.text_tokens, ds.crops, ds.answer_tokens, tokens_per_crop)


def uniform_mix(n: int, seq: int, crops: int, tokens_per_crop: int = 196) -> LengthMix:
    """``n`` samples of exactly ``seq`` LLM tokens, ``crops`` crops each (the padding-free case)."""
    import numpy as np

    text = seq - crops * tokens_per_crop
    if text < 8:
        raise ValueError(f"seq {seq} leaves no room for text after {crops} crops x {tokens_per_crop}")
    full = np.full(n, text, dtype=np.int64)
    return LengthMix(f"uniform {seq}", full, np.full(n, crops, dtype=np.int64), full - 4, tokens_per_crop)


def synthetic_item(mix: LengthMix, i: int, gen, image_pool) -> dict:
    """Sample ``i`` of ``mix`` as the dataset would return it: random token ids (one <image>
    sentinel when it has crops), labels on its last ``answer`` tokens, its crops a slice of
    ``image_pool`` [K_max, 3, B, B] (contents do not matter to speed)."""
    import torch

    from bluelm_v.chat import IMAGE_TOKEN_ID

    text, crops, answer = int(mix.text[i]), int(mix.crops[i]), int(mix.answer[i])
    ids = torch.randint(3, 250, (text,), generator=gen).tolist()
    labels = [-100] * (text - answer) + ids[text - answer:]
    images = []
    if crops:
        ids.insert(1, IMAGE_TOKEN_ID)
        labels.insert(1, -100)
        images = [image_pool[:crops]]
    return {"input_ids": ids, "labels": labels, "images": images, "length": int(mix.lengths[i]), "index": i}
