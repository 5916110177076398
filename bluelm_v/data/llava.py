"""LLaVA-format training data through the configured tiler (docs/design.md §4, §9).

A JSON list of {"id", "image" (relative path, optional; a list for several images),
"conversations": [{"from": "human"|"gpt", "value": "...<image>..."}]}.

    ds = LlavaDataset("llava_v1_5_mix665k.json", "images/", tiler, tokenizer,
                      tokens_per_crop=196, max_length=2048, cache_dir="cache/")
    ds.lengths          # LLM tokens of each kept sample (text + visual), known before any image is decoded
    ds.text_tokens, ds.crops, ds.answer_tokens      # its parts (numpy int arrays)
    ds.skipped          # Counter: reason -> count (bad samples never stop a run)
    item = ds[i]        # {"input_ids", "labels", "images": [[K,3,B,B], ...], "length", "index"}
    item = ds.get(i, fits=1500)    # a replacement, if needed, of at most 1500 tokens (packed rows)

Lengths before loading: construction reads the JSON, tokenises each conversation once to count its
text tokens, reads each image's size from its file header (bluelm_v.data.image_sizes) and asks the
tiler how many crops that size becomes (``select_many`` / ``num_crops``, vectorised); no pixel is
decoded (except a JPEG/PNG whose end marker is missing: then a full decode decides whether it is
truncated). With ``cache_dir`` both scans are cached on disk: the text scan per (file, its size and
mtime, tokenizer, system prompt, chat template), the header sizes per image root, so a rerun, another
rank or another tiler re-reads nothing. Token ids are rebuilt per item in ``__getitem__``.

What can only fail on a full decode is caught in ``__getitem__``, counted, and replaced by the
next usable sample (no longer than ``fits``) so every rank keeps its batch. Reasons:

    malformed              not a record with a list of human/gpt turns and an assistant answer
    missing_image          the image file does not exist
    bad_image              the file is not a readable image (header or full decode), or 0 px
    too_large              more pixels than images.max_pixels (a decompression-bomb guard)
    no_image_token         an image is given but no <image> placeholder in the text
    too_many_image_tokens  more <image> placeholders than images (incl. text-only records)
    too_long               text + visual tokens exceed max_length
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import InputError
from .image_sizes import max_image_pixels, open_image

REASONS = ("malformed", "missing_image", "bad_image", "too_large", "no_image_token", "too_many_image_tokens",
           "too_long")
TEXT_SCAN_VERSION = 2
_PROBE = [{"from": "human", "value": "<image>\nWhat is shown? Ünïcode, 12345."}, {"from": "gpt", "value": "A cat."}]


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
    img = record.get("image") if isinstance(record, dict) else None
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


def scan_text(record: Any, tokenizer, system: str | None) -> tuple[str | None, str, int, int]:
    """(reason or None, detail, text tokens without the <image> sentinels, answer tokens) of one
    record."""
    from ..chat import count_placeholders, tokenize_conversation

    convs = record.get("conversations") if isinstance(record, dict) else None
    if (not isinstance(convs, list) or not convs
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in convs)
            or not any(t.get("from") in ("gpt", "assistant") for t in convs)):
        return "malformed", "needs conversations with a gpt/assistant turn", 0, 0
    images = image_paths(record)
    placeholders = sum(count_placeholders(t["value"]) for t in convs)
    if placeholders > len(images):
        return "too_many_image_tokens", f"{placeholders} <image> for {len(images)} image(s)", 0, 0
    if images and placeholders < len(images):
        return "no_image_token", f"{len(images)} image(s), {placeholders} <image>", 0, 0
    try:
        tok = tokenize_conversation(convs, tokenizer, system=system)
    except InputError as exc:
        return "malformed", str(exc), 0, 0
    answer = sum(1 for label in tok["labels"] if label >= 0)
    if not answer:
        return "malformed", "no assistant tokens", 0, 0
    return None, "", len(tok["input_ids"]) - tok["n_images"], answer


def tokenizer_fingerprint(tokenizer, system: str | None) -> str:
    """Changes when the tokenizer, the system prompt or the chat template would count differently."""
    from ..chat import tokenize_conversation

    probe = tokenize_conversation(_PROBE, tokenizer, system=system)
    key = json.dumps([type(tokenizer).__name__, tokenizer.vocab_size, probe["input_ids"], probe["labels"],
                      system, TEXT_SCAN_VERSION])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class LlavaDataset:
    """Usable samples of a LLaVA-format file, tokenised with the chat template."""

    def __init__(self, json_path: str | Path, image_root: str | Path | None, tiler, tokenizer,
                 tokens_per_crop: int, max_length: int = 2048, system: str | None = None,
                 max_samples: int | None = None, keep_examples: int = 20, cache_dir: str | Path | None = None):
        import numpy as np

        self.json_path = Path(json_path)
        self.image_root = Path(image_root) if image_root else self.json_path.parent
        self.tiler, self.tokenizer = tiler, tokenizer
        self.tokens_per_crop, self.max_length, self.system = int(tokens_per_crop), int(max_length), system
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.skipped: Counter = Counter()
        self.examples: list[dict] = []          # first few skipped samples: id, reason, detail
        self._keep_examples = keep_examples
        self._bad: set[int] = set()             # kept samples whose images failed to decode
        records = load_records(self.json_path)
        if max_samples is not None:
            records = records[:max_samples]
        self.n_records = len(records)
        self.scan_info: dict = {}
        reason, detail, text, answer = self._text_scan(records)
        crops = self._crops(records, reason, detail)
        lengths = text + crops * self.tokens_per_crop
        too_long = (reason == "") & (lengths > self.max_length)
        reason[too_long] = "too_long"
        for i in np.flatnonzero(too_long):
            detail[i] = f"{int(lengths[i])} > {self.max_length} tokens"
        for i in np.flatnonzero(reason != ""):
            self.skip(records[i], str(reason[i]), str(detail[i]))
        keep = np.flatnonzero(reason == "")
        self.records = [records[i] for i in keep]
        self.lengths: list[int] = lengths[keep].tolist()
        self.text_tokens, self.crops, self.answer_tokens = text[keep], crops[keep], answer[keep]   # numpy [N]
        if not self.records:
            raise InputError(f"{self.json_path}: none of its {self.n_records} samples is usable "
                             f"(skipped: {dict(self.skipped)})")

    # -- scanning -----------------------------------------------------------------------
    def skip(self, record: Any, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < self._keep_examples:
            rid = record.get("id") if isinstance(record, dict) else None
            self.examples.append({"id": rid, "reason": reason, "detail": detail})

    def _text_cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        st = self.json_path.stat()
        key = json.dumps([str(self.json_path.resolve()), st.st_size, st.st_mtime_ns, self.n_records,
                          tokenizer_fingerprint(self.tokenizer, self.system)])
        return self.cache_dir / f"llava_text-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"

    def _text_scan(self, records):
        """Per record: reason ("" = usable so far), detail, text and answer tokens (numpy arrays); cached."""
        import numpy as np

        path = self._text_cache_file()
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    reason, detail = z["reason"].astype(object), z["detail"].astype(object)
                    text, answer = z["text"].astype(np.int64), z["answer"].astype(np.int64)
                if len(reason) == len(records):
                    self.scan_info["text_cache"] = "hit"
                    return reason, detail, text, answer
            except (OSError, ValueError, KeyError):
                pass                                  # a damaged cache is rebuilt, never fatal
        rows = [scan_text(rec, self.tokenizer, self.system) for rec in records]
        reason = np.array([r[0] or "" for r in rows], dtype=object)
        detail = np.array([r[1] for r in rows], dtype=object)
        text = np.array([r[2] for r in rows], dtype=np.int64)
        answer = np.array([r[3] for r in rows], dtype=np.int64)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, reason=reason.astype(str), detail=detail.astype(str), text=text.astype(np.int32),
                     answer=answer.astype(np.int32))
            os.replace(tmp, path)
            self.scan_info["text_cache"] = "written"
        return reason, detail, text, answer

    def _crops(self, records, reason, detail):
        """Crops of each record's images from their header sizes and the tiler (0 for text-only);
        records whose images are missing or unreadable get their reason here."""
        import numpy as np

        owner, paths = [], []
        for i, rec in enumerate(records):
            if reason[i] == "":
                for rel in image_paths(rec):
                    owner.append(i)
                    paths.append(str(rel))
        crops = np.zeros(len(records), dtype=np.int64)
        if not paths:
            return crops
        sizes = self._header_sizes(paths)
        w, h, why = sizes["width"].to_numpy(), sizes["height"].to_numpy(), sizes["reason"].to_numpy()
        owner = np.asarray(owner)
        ok = why == "ok"
        limit = max_image_pixels()                    # images.max_pixels: a decompression-bomb guard
        big = ok & (w.astype(np.int64) * h.astype(np.int64) > limit) if limit is not None else ok & False
        for j in np.flatnonzero(~ok | big):
            i = owner[j]
            if reason[i] == "" and big[j]:
                reason[i] = "too_large"
                detail[i] = f"{self.image_root / paths[j]}: {w[j]}x{h[j]} > {limit:,} pixels"
            elif reason[i] == "":
                reason[i] = "missing_image" if why[j] == "missing_file" else "bad_image"
                detail[i] = f"{self.image_root / paths[j]} ({why[j]})"
        ok &= ~big
        if ok.any():
            m, n = self.tiler.select_many(w[ok], h[ok])
            np.add.at(crops, owner[ok], np.asarray(self.tiler.num_crops(m, n), dtype=np.int64))
        return crops

    def _header_sizes(self, paths):
        """DataFrame image,width,height,reason for ``paths`` (same order): the header cache of
        bluelm_v.data.image_sizes when ``cache_dir`` is set, else a scan in this process."""
        import pandas as pd

        from .image_sizes import cached_scan, scan_image_sizes

        if self.cache_dir is not None:
            table, info = cached_scan(self.image_root, paths, self.cache_dir)
            self.scan_info["image_sizes"] = {k: info[k] for k in ("cache_file", "n_scanned", "n_from_cache")}
            return table.set_index("image").loc[paths].reset_index()
        rows = scan_image_sizes(self.image_root, paths)
        return pd.DataFrame({"image": paths, "width": [r[0] for r in rows], "height": [r[1] for r in rows],
                             "reason": [r[2] for r in rows]})

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
        return self.get(index)

    def get(self, index: int, fits: int | None = None) -> dict:
        """The sample, or (when its image fails to decode) the next usable one of at most
        ``fits`` tokens (default: any); failures are counted under ``bad_image`` and remembered so
        they are not decoded again."""
        from ..chat import tokenize_conversation

        for attempt in range(len(self.records)):
            j = (index + attempt) % len(self.records)
            if j in self._bad or (fits is not None and self.lengths[j] > fits):
                continue
            try:
                images = self.load_images(j)
            except Exception as exc:  # noqa: BLE001 -- any decode failure is a bad sample
                self.skip(self.records[j], "bad_image", f"{type(exc).__name__}: {exc}")
                self._bad.add(j)
                continue
            tok = tokenize_conversation(self.records[j]["conversations"], self.tokenizer, system=self.system)
            return {"input_ids": tok["input_ids"], "labels": tok["labels"], "images": images,
                    "length": self.lengths[j], "index": j}
        raise InputError(f"{self.json_path}: no sample could be loaded (skipped: {dict(self.skipped)})")

    def summary(self) -> dict:
        return {"records": self.n_records, "kept": len(self.records), "skipped": dict(self.skipped),
                "skipped_examples": self.examples[:5], "scan": self.scan_info}
