"""Per-sample image sizes of a LLaVA-format dataset (llava_v1_5_mix665k.json layout).

    samples, skipped, info = llava_samples("mix665k.json", "images/", cache_dir="cache/")

The file is a JSON list (or ``.jsonl``, one record a line) of
``{"id", "image" (optional, relative to image_root), "conversations": [...]}``. Every record
with an image is one sample: an image used by three samples counts three times, as in the
paper's per-sample ablation. Sizes come from the image headers (bluelm_v.data.image_sizes:
parallel Ray tasks, cached per image root so a rerun does not rescan).

Records that cannot be used are returned in ``skipped`` with a reason, never fatal:
``text_only`` (no image), ``malformed_record`` (not an object, no ``conversations`` list,
``image`` not a non-empty string, a JSONL line that is not JSON), and the image reasons of
image_sizes (missing_file, truncated, not_an_image, ...). A file that is not JSON at all, or
not a list, is an InputError naming the line.

``row`` in both tables is the 0-based record index (``.json``) or 1-based line (``.jsonl``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .image_sizes import cached_scan


def _records(path: Path):
    """Yield (row, record-or-exception)."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, exc
        return
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"LLaVA JSON {path}, line {exc.lineno} column {exc.colno}: not valid JSON "
                         f"({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"LLaVA JSON {path}: not UTF-8 text ({exc})") from None
    if not isinstance(data, list):
        raise InputError(f"LLaVA JSON {path}, line 1: expected a JSON list of records, got a "
                         f"{type(data).__name__}")
    yield from enumerate(data)


def read_llava_records(path):
    """(samples, skipped) as DataFrames: samples has row, id, image; skipped has row, id,
    image, reason, detail."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LLaVA JSON {path}: no such file")
    good, bad = [], []
    for row, rec in _records(path):
        if isinstance(rec, Exception):
            bad.append((row, "", "", "malformed_record", f"not JSON: {rec.msg}"))
            continue
        if not isinstance(rec, dict):
            bad.append((row, "", "", "malformed_record", f"a record must be an object, got {type(rec).__name__}"))
            continue
        rid = str(rec.get("id", ""))
        image = rec.get("image")
        if not isinstance(rec.get("conversations"), list):
            bad.append((row, rid, str(image or ""), "malformed_record", "no 'conversations' list"))
        elif image is None:
            bad.append((row, rid, "", "text_only", ""))
        elif not isinstance(image, str) or not image.strip():
            bad.append((row, rid, str(image), "malformed_record", "'image' must be a non-empty string"))
        else:
            good.append((row, rid, image))
    samples = pd.DataFrame(good, columns=["row", "id", "image"])
    skipped = pd.DataFrame(bad, columns=["row", "id", "image", "reason", "detail"])
    return samples.astype({"row": "int64"}), skipped.astype({"row": "int64"})


def llava_samples(json_path, image_root, cache_dir, *, rescan: bool = False, files_per_task: int = 1000,
                  check_end: bool = True, progress=None):
    """(samples with width/height, skipped, info): one row per usable sample."""
    import numpy as np
    import pandas as pd

    root = Path(image_root)
    if not root.is_dir():
        raise InputError(f"image root {root}: no such directory")
    samples, skipped = read_llava_records(json_path)
    sizes, info = cached_scan(root, samples["image"], cache_dir, rescan=rescan,
                              files_per_task=files_per_task, check_end=check_end, progress=progress)
    joined = samples.merge(sizes, on="image", how="left", validate="many_to_one")
    ok = (joined["reason"] == "ok").to_numpy()
    bad_images = joined[~ok].assign(detail="")[["row", "id", "image", "width", "height", "reason", "detail"]]
    skipped = pd.concat([skipped, bad_images], ignore_index=True)
    skipped = skipped.sort_values("row", kind="stable").reset_index(drop=True)
    for col in ("width", "height"):
        skipped[col] = skipped[col].fillna(0).astype(np.int64)
    info.update(n_records=int(len(samples) + (skipped["reason"].isin(["text_only", "malformed_record"])).sum()),
                n_text_only=int((skipped["reason"] == "text_only").sum()))
    return joined[ok].drop(columns=["reason"]).reset_index(drop=True), skipped, info
