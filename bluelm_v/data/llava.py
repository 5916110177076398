"""LLaVA-format training data through the configured tiler (docs/design.md §4).

A JSON list of {"id", "image" (relative path, optional; a list for several images),
"conversations": [{"from": "human"|"gpt", "value": "...<image>..."}]}.

    ds = LlavaDataset("llava_v1_5_mix665k.json", "images/", tiler, tokenizer,
                      tokens_per_crop=196, max_length=2048)
    ds.lengths          # LLM tokens of each kept sample (text + visual), for length grouping
    ds.skipped          # Counter: reason -> count (bad samples never stop a run)
    item = ds[i]        # {"input_ids", "labels", "images": [[K,3,B,B], ...], "length", "index"}

Construction scans every record (JSON structure, placeholders, image header, token count) and
keeps the usable ones; what can only fail on a full decode is caught in ``__getitem__``, counted,
and replaced by the next usable sample so every rank keeps its batch size. Reasons:

    malformed              not a record with a list of human/gpt turns and an assistant answer
    missing_image          the image file does not exist
    bad_image              the file is not a readable image (header or full decode), or 0 px
    too_large              more pixels than images.max_pixels (a decompression-bomb guard)
    no_image_token         an image is given but no <image> placeholder in the text
    too_many_image_tokens  more <image> placeholders than images (incl. text-only records)
    too_long               text + visual tokens exceed max_length
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import InputError
from .image_sizes import max_image_pixels, open_image, read_image_size

REASONS = ("malformed", "missing_image", "bad_image", "too_large", "no_image_token", "too_many_image_tokens",
           "too_long")


def load_records(json_path: str | Path) -> list:
    """The JSON list of a LLaVA-format file (an InputError naming the file otherwise)."""
    path = Path(json_path)
    if not path.is_file():
        raise InputError(f"{path}: LLaVA-format JSON not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def image_paths(record: dict) -> list[str]:
    img = record.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


class LlavaDataset:
    """Usable samples of a LLaVA-format file, tokenised with the chat template."""

    def __init__(self, json_path: str | Path, image_root: str | Path | None, tiler, tokenizer,
                 tokens_per_crop: int, max_length: int = 2048, system: str | None = None,
                 max_samples: int | None = None, keep_examples: int = 20):
        self.json_path = Path(json_path)
        self.image_root = Path(image_root) if image_root else self.json_path.parent
        self.tiler, self.tokenizer = tiler, tokenizer
        self.tokens_per_crop, self.max_length, self.system = int(tokens_per_crop), int(max_length), system
        self.skipped: Counter = Counter()
        self.examples: list[dict] = []          # first few skipped samples: id, reason, detail
        self._keep_examples = keep_examples
        self.records: list[dict] = []
        self.tokenized: list[dict] = []
        self.lengths: list[int] = []
        records = load_records(self.json_path)
        if max_samples is not None:
            records = records[:max_samples]
        self.n_records = len(records)
        for i, rec in enumerate(records):
            kept = self._scan(i, rec)
            if kept is not None:
                tok, length = kept
                self.records.append(rec)
                self.tokenized.append(tok)
                self.lengths.append(length)
        if not self.records:
            raise InputError(f"{self.json_path}: none of its {self.n_records} samples is usable "
                             f"(skipped: {dict(self.skipped)})")

    # -- scanning -----------------------------------------------------------------------
    def skip(self, record: Any, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < self._keep_examples:
            rid = record.get("id") if isinstance(record, dict) else None
            self.examples.append({"id": rid, "reason": reason, "detail": detail})

    def _scan(self, i: int, rec: Any):
        from ..chat import count_placeholders, tokenize_conversation

        convs = rec.get("conversations") if isinstance(rec, dict) else None
        if (not isinstance(convs, list) or not convs
                or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in convs)
                or not any(t.get("from") in ("gpt", "assistant") for t in convs)):
            return self.skip(rec, "malformed", "needs conversations with a gpt/assistant turn")
        images = image_paths(rec)
        placeholders = sum(count_placeholders(t["value"]) for t in convs)
        if placeholders > len(images):
            return self.skip(rec, "too_many_image_tokens", f"{placeholders} <image> for {len(images)} image(s)")
        if images and placeholders < len(images):
            return self.skip(rec, "no_image_token", f"{len(images)} image(s), {placeholders} <image>")
        crops = 0
        for rel in images:
            path = self.image_root / rel
            if not path.is_file():
                return self.skip(rec, "missing_image", str(path))
            size = self._header_size(path)
            if size is None:
                return self.skip(rec, "bad_image", str(path))
            limit = max_image_pixels()
            if limit is not None and size[0] * size[1] > limit:
                return self.skip(rec, "too_large", f"{path}: {size[0]}x{size[1]} > {limit:,} pixels")
            m, n = self.tiler.select(*size)
            crops += int(self.tiler.num_crops(m, n))
        try:
            tok = tokenize_conversation(convs, self.tokenizer, system=self.system)
        except InputError as exc:
            return self.skip(rec, "malformed", str(exc))
        if all(label < 0 for label in tok["labels"]):
            return self.skip(rec, "malformed", "no assistant tokens")
        length = len(tok["input_ids"]) - tok["n_images"] + crops * self.tokens_per_crop
        if length > self.max_length:
            return self.skip(rec, "too_long", f"{length} > {self.max_length} tokens")
        return tok, length

    @staticmethod
    def _header_size(path: Path) -> tuple[int, int] | None:
        w, h, reason = read_image_size(path, check_end=False)   # the header only, any size
        return (w, h) if reason == "ok" else None

    # -- items --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load_images(self, index: int) -> list:
        """Each image of sample ``index`` through the tiler -> list of [K,3,B,B] tensors."""
        out = []
        for rel in image_paths(self.records[index]):
            with open_image(self.image_root / rel, str(rel)) as im:
                out.append(self.tiler.transform(im.convert("RGB")).pixels)   # [K, 3, B, B]
        return out

    def __getitem__(self, index: int) -> dict:
        """The sample, or (when its image fails to decode) the next usable one; failures are
        counted under ``bad_image`` and remembered so they are not decoded again."""
        for attempt in range(len(self.records)):
            j = (index + attempt) % len(self.records)
            if self.tokenized[j] is None:
                continue
            try:
                images = self.load_images(j)
            except Exception as exc:  # noqa: BLE001 -- any decode failure is a bad sample
                self.skip(self.records[j], "bad_image", f"{type(exc).__name__}: {exc}")
                self.tokenized[j] = None
                continue
            tok = self.tokenized[j]
            return {"input_ids": tok["input_ids"], "labels": tok["labels"], "images": images,
                    "length": self.lengths[j], "index": j}
        raise InputError(f"{self.json_path}: no sample could be loaded (skipped: {dict(self.skipped)})")

    def summary(self) -> dict:
        return {"records": self.n_records, "kept": len(self.records), "skipped": dict(self.skipped),
                "skipped_examples": self.examples[:5]}
