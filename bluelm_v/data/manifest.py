"""Image-size manifests: CSV files with ``width,height`` columns, and the embedded default.

    from bluelm_v.data.manifest import read_size_manifest, split_bad_sizes
    table = read_size_manifest()              # the embedded COCO train2017 sizes (118,287 rows)
    table = read_size_manifest("sizes.csv")   # any CSV (or .csv.gz) with width,height columns
    good, skipped = split_bad_sizes(table)    # bad rows, zero/negative/huge sizes -> skipped, with a reason
    samples, skipped, info = load_samples(cfg.dataset, run_dir)   # what the tiling jobs read

A manifest may carry more columns (``image``, ``source``, ``id``, ...): they are kept as text.
A manifest without a usable header (empty file, a missing width/height column, broken CSV
quoting) fails at once with an InputError naming the file and the line. A bad row is never
dropped: it is returned with a ``reason`` (``wrong_field_count``, ``missing_size`` -- e.g. a
row that is just ``,`` -- or ``not_an_integer``) and a ``detail``, and :func:`split_bad_sizes`
skips it under that reason, as it skips impossible sizes (0, -5). Only empty lines are ignored.
The ``line`` column is the 1-based line of the file each row came from (the header is line 1).

Embedded data, ``coco2017_train_image_sizes.csv.gz`` (provenance, from its README):

    Width and height (pixels) of all 118,287 images of COCO train2017, one image a row, no ids.
    COCO train2017 is the image source of 364,100 of the ~624,610 image samples of the
    LLaVA-1.5 665k instruction mix, so this is real data for the tiling ablation. Derived from
    the COCO 2017 annotations (COCO terms: annotations CC BY 4.0), as redistributed in
    Ultralytics' coco2017labels. Row order carries no meaning; the mapping to image ids is not
    included.

    Counts of the LLaVA-1.5 665k mix by image folder (from the LLaVA maintainers' published
    counts): coco 364,100 · vg 86,417 · ocr_vqa 80,000 · gqa 72,140 · textvqa 21,953 ·
    text-only 40,688.

The file here is the shared CSV gzipped (``gzip -9 -n``); its uncompressed SHA-256 is
c2fd057945f6a4fc12dbbca995462574f57d09ae0cdc50a4ba99cde7bd102cd4.
"""
from __future__ import annotations

import csv
import gzip
import io
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, InputError

COCO_TRAIN2017_FILE = "coco2017_train_image_sizes.csv.gz"
COCO_TRAIN2017_IMAGES = 118_287
LLAVA665K_BY_SOURCE = {"coco": 364_100, "vg": 86_417, "ocr_vqa": 80_000, "gqa": 72_140,
                       "textvqa": 21_953, "text-only": 40_688}
LLAVA665K_SAMPLES = sum(LLAVA665K_BY_SOURCE.values())                           # 665,298
LLAVA665K_IMAGE_SAMPLES = LLAVA665K_SAMPLES - LLAVA665K_BY_SOURCE["text-only"]  # 624,610
MAX_SIDE = 2**31 - 1
REQUIRED = ("width", "height")


def coco_train2017_sizes():
    """The embedded manifest (an importlib.resources Traversable; ``str()`` of it is a path
    for a normal install)."""
    return resources.files("bluelm_v.data") / COCO_TRAIN2017_FILE


def _open_text(path):
    raw = path.open("rb") if hasattr(path, "open") and not isinstance(path, (str, Path)) else open(path, "rb")
    if str(path).endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def read_size_manifest(path=None):
    """Read a size manifest into a pandas DataFrame: ``width``, ``height`` (int64), ``line``,
    and any other columns as strings. ``path=None`` reads the embedded COCO train2017 sizes."""
    import numpy as np
    import pandas as pd

    source = coco_train2017_sizes() if path is None else Path(path)
    name = str(source)
    if path is not None and not source.is_file():
        raise InputError(f"size manifest {name}: no such file")
    try:
        with _open_text(source) as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"size manifest {name}: cannot be read as UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise InputError(f"size manifest {name}, line 1: malformed CSV header ({exc})") from None
    if not any(header):
        raise InputError(f"size manifest {name}, line 1: empty file; expected a header with "
                         f"columns {','.join(REQUIRED)}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"size manifest {name}, line 1: missing column(s) {', '.join(missing)} "
                         f"(header: {','.join(header)}); a size manifest needs columns width,height")
    rows, lines, problems = [], [], []
    try:
        for row in reader:
            if not row:
                continue  # an empty line (csv yields no fields for it)
            problem = ("", "")
            if len(row) != len(header):
                problem = ("wrong_field_count", f"{len(row)} fields, the header has {len(header)}")
                row = (row + [""] * len(header))[:len(header)]
            rows.append(row)
            lines.append(reader.line_num)
            problems.append(problem)
    except csv.Error as exc:
        raise InputError(f"size manifest {name}, line {reader.line_num}: malformed CSV ({exc})") from None
    table = pd.DataFrame(rows, columns=header, dtype=str)
    table["line"] = np.asarray(lines, dtype=np.int64)
    reason = np.array([p[0] for p in problems], dtype=object)
    detail = np.array([p[1] for p in problems], dtype=object)
    for col in REQUIRED:
        values = table[col].str.strip()
        ok = values.str.fullmatch(r"[+-]?\d+").to_numpy(dtype=bool)
        fresh = ~ok & (reason == "")
        empty = (values == "").to_numpy()
        reason[fresh] = np.where(empty[fresh], "missing_size", "not_an_integer")
        detail[fresh] = [f"{col} = {v!r}" for v in table[col].to_numpy()[fresh]]
        digits = values.str.lstrip("+-").str.len()
        values = values.where(ok & (digits <= 15).to_numpy(), str(10**15))  # absurd sizes: kept, skipped later
        values = values.where(ok, "0")
        table[col] = values.astype(np.int64)
    table["reason"], table["detail"] = reason, detail
    return table


def split_bad_sizes(table):
    """(good rows, bad rows with a ``reason``): a row's own reason from the reader
    (``wrong_field_count``, ``missing_size``, ``not_an_integer``), else ``nonpositive_size``
    (a side <= 0) or ``size_too_large`` (a side above 2**31 - 1). The good rows lose the
    ``reason`` / ``detail`` columns."""
    import numpy as np

    w, h = table["width"].to_numpy(), table["height"].to_numpy()
    given = (table["reason"].fillna("").to_numpy(dtype=object) if "reason" in table.columns
             else np.full(len(table), "", object))
    nonpositive = (w <= 0) | (h <= 0)
    too_large = ~nonpositive & ((w > MAX_SIDE) | (h > MAX_SIDE))
    reason = np.where(given != "", given, np.where(nonpositive, "nonpositive_size",
                                                   np.where(too_large, "size_too_large", "")))
    bad_rows = reason != ""
    bad = table[bad_rows].copy()
    bad["reason"] = reason[bad_rows]
    if "detail" not in bad.columns:
        bad["detail"] = ""
    good = table[~bad_rows].drop(columns=[c for c in ("reason", "detail") if c in table.columns])
    return good.reset_index(drop=True), bad.reset_index(drop=True)


# -- the samples of a size study (the tiling jobs' ``dataset`` node) ---------------------------
_PARSED: dict = {}


def read_manifest(path):
    """read_size_manifest, parsed once per (path, mtime) in this process (validate, then run)."""
    if path is None:
        return read_size_manifest(None)
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _PARSED:
        _PARSED.clear()
        _PARSED[key] = read_size_manifest(path)
    return _PARSED[key].copy()


def validate_dataset(ds) -> None:
    if ds.get("manifest") and ds.get("llava_json"):
        raise ConfigError("dataset: set dataset.manifest or dataset.llava_json, not both")
    if ds.get("manifest"):
        if not Path(ds.manifest).is_file():
            raise ConfigError(f"dataset.manifest: no such file: {ds.manifest}")
        read_manifest(ds.manifest)  # a manifest without a usable header fails here, before Ray starts
    if ds.get("llava_json"):
        if not Path(ds.llava_json).is_file():
            raise ConfigError(f"dataset.llava_json: no such file: {ds.llava_json}")
        if not ds.get("image_root") or not Path(ds.image_root).is_dir():
            raise ConfigError(f"dataset.image_root: the folder the JSON's image paths are relative to; "
                              f"got {ds.get('image_root')!r}, which is not a directory")
    per_task = ds.get("files_per_task", 1000)
    if not isinstance(per_task, int) or isinstance(per_task, bool) or per_task < 1:
        raise ConfigError(f"dataset.files_per_task: a positive integer, got {per_task!r}")


def load_samples(ds, run_dir, progress=None):
    """The samples of a size study from a ``dataset`` config node: (samples with width/height,
    skipped rows with a reason, dataset info)."""
    import pandas as pd

    if ds.get("llava_json"):
        from .llava_sizes import llava_samples

        cache_dir = Path(ds.cache_dir) if ds.get("cache_dir") else Path(run_dir).resolve().parent / "size_cache"
        samples, skipped, info = llava_samples(
            ds.llava_json, ds.image_root, cache_dir, rescan=bool(ds.get("rescan", False)),
            files_per_task=int(ds.get("files_per_task", 1000)), check_end=bool(ds.get("check_end", True)),
            progress=progress)
        info = {"kind": "llava_json", "path": str(ds.llava_json), "image_root": str(ds.image_root),
                "row_means": "record index (.json) or line (.jsonl)", **info}
    else:
        table = read_manifest(ds.get("manifest"))
        embedded = not ds.get("manifest")
        info = {"kind": "embedded_coco2017_train" if embedded else "manifest",
                "path": COCO_TRAIN2017_FILE if embedded else str(ds.manifest),
                "row_means": "line of the manifest file (header = line 1)"}
        samples, skipped = split_bad_sizes(table.rename(columns={"line": "row"}))
    good, bad = split_bad_sizes(samples)
    skipped = pd.concat([skipped, bad], ignore_index=True)
    info["n_input_rows"] = int(len(good) + len(skipped))
    return good, skipped, info


def write_skipped(path: Path, skipped) -> None:
    cols = [c for c in ("row", "id", "image", "source", "width", "height", "reason", "detail") if c in skipped.columns]
    tmp = path.with_suffix(".csv.tmp")
    skipped[cols].to_csv(tmp, index=False)
    tmp.replace(path)
