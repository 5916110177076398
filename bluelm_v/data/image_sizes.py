"""Image sizes from file headers (no pixel decode), in parallel Ray tasks, with a cache.

    read_image_size("a.jpg")                        -> (640, 480, "ok")
    open_image("a.jpg", "image")                    -> a lazy PIL image, or InputError when the image
                                                       has more pixels than images.max_pixels
    scan_image_sizes(root, ["a.jpg", "b.png"])      -> [(w, h, reason), ...]   one process
    scan_parallel(root, paths)                      -> DataFrame image,width,height,reason
    cached_scan(root, paths, cache_dir)             -> (DataFrame, info)  scans only what is new

Only the header is parsed (``PIL.Image.open`` is lazy), so a decompression-bomb-sized image
(more than PIL's MAX_IMAGE_PIXELS) is measured, never decoded: the limit is lifted for the
header read only. Reasons other than ``ok`` (the sample is skipped and counted):

    missing_file   no such file              not_a_file    a directory or special file
    empty_file     0 bytes                   unreadable    permission or I/O error
    not_an_image   no known image signature and PIL cannot identify it
    truncated      a known signature (JPEG, PNG, GIF, BMP, WebP, TIFF) whose header PIL cannot
                   parse, or (``check_end=True``) a JPEG/PNG without its end marker (EOI /
                   IEND) in the last 1 KiB that also fails a full decode (files with trailing
                   data after the end marker, e.g. motion photos, decode fine and count as ok;
                   images above PIL's pixel limit are not decoded and count as truncated)
    bad_size       the header says width or height <= 0

Images that are decoded (the runtime, the training data) are opened with :func:`open_image`: one
above ``images.max_pixels`` (conf/config.yaml; the launcher exports it as
BLUELM_V_MAX_IMAGE_PIXELS to the job and its Ray workers) is refused with one line naming its
size and the limit, before any pixel is decoded.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
import warnings
from pathlib import Path

PIL_DEFAULT_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as shipped
PIXELS_ENV = "BLUELM_V_MAX_IMAGE_PIXELS"  # images.max_pixels ("none": no limit)
SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
              (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
TAIL_BYTES = 1024


def _signature(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES if head.startswith(magic)), None)


def _decodes(fh) -> bool:
    from PIL import Image

    fh.seek(0)
    try:
        with Image.open(fh) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 -- any decode failure means the data is incomplete
        return False


def max_image_pixels() -> int | None:
    """The images.max_pixels setting in effect (PIL's default outside a launched job)."""
    value = os.environ.get(PIXELS_ENV, "").strip().lower()
    if value in ("none", "null"):
        return None
    return int(value) if value.isdigit() and int(value) > 0 else PIL_DEFAULT_MAX_PIXELS


def open_image(path, name: str = "image"):
    """``PIL.Image.open`` (lazy: the header only) of an image at most images.max_pixels large;
    a larger one -> InputError naming the input, its size and the limit."""
    from PIL import Image

    from ..errors import InputError

    limit = max_image_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit_before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours is checked below
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit_before
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise InputError(f"{name}: {str(path)!r} is {width}x{height} = {width * height:,} pixels, above the "
                         f"limit of {limit:,} (images.max_pixels; a decompression-bomb guard): "
                         "refused before decoding. Raise images.max_pixels to accept it")
    return img


def read_image_size(path, check_end: bool = True) -> tuple[int, int, str]:
    """(width, height, reason) of one file from its header; reason is "ok" or why not."""
    from PIL import Image

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, 0, "missing_file"
    except NotADirectoryError:
        return 0, 0, "missing_file"
    except OSError:
        return 0, 0, "unreadable"
    if not stat.S_ISREG(st.st_mode):
        return 0, 0, "not_a_file"
    if st.st_size == 0:
        return 0, 0, "empty_file"
    try:
        fh = open(path, "rb")
    except OSError:
        return 0, 0, "unreadable"
    with fh:
        kind = _signature(fh.read(16))
        fh.seek(0)
        limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # measure bombs from the header; nothing is decoded
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(fh) as im:
                    width, height, fmt = int(im.size[0]), int(im.size[1]), im.format
        except Exception:  # noqa: BLE001 -- PIL raises many types for broken headers
            return 0, 0, "truncated" if kind else "not_an_image"
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        if width <= 0 or height <= 0:
            return width, height, "bad_size"
        marker = END_MARKERS.get(fmt)
        if check_end and marker is not None:
            fh.seek(max(0, st.st_size - TAIL_BYTES))
            if marker not in fh.read():
                small = width * height <= PIL_DEFAULT_MAX_PIXELS
                if not (small and _decodes(fh)):
                    return width, height, "truncated"
    return width, height, "ok"


def scan_image_sizes(root, paths, check_end: bool = True) -> list[tuple[int, int, str]]:
    """read_image_size for each path (relative to ``root``), in this process."""
    root = Path(root)
    return [read_image_size(root / p, check_end) for p in paths]


_REMOTE = None


def scan_parallel(root, paths, files_per_task: int = 1000, check_end: bool = True, progress=None):
    """Scan ``paths`` in Ray tasks of ``files_per_task`` files (in-process when Ray is not
    initialised). Returns a DataFrame with columns image, width, height, reason."""
    import pandas as pd

    global _REMOTE
    paths = list(paths)
    chunks = [paths[a:a + files_per_task] for a in range(0, len(paths), files_per_task)]
    results: list[list] = [None] * len(chunks)
    bar = progress(total=len(paths), desc="header scan", unit="img") if progress else None
    try:
        import ray
        use_ray = ray.is_initialized() and len(chunks) > 0
    except ImportError:
        use_ray = False
    if use_ray:
        if _REMOTE is None:
            _REMOTE = ray.remote(num_cpus=1, max_retries=2)(scan_image_sizes)
        pending = {_REMOTE.remote(str(root), chunk, check_end): i for i, chunk in enumerate(chunks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            if bar:
                bar.update(len(chunks[i]))
    else:
        for i, chunk in enumerate(chunks):
            results[i] = scan_image_sizes(root, chunk, check_end)
            if bar:
                bar.update(len(chunk))
    if bar:
        bar.close()
    flat = [r for part in results for r in part]
    return pd.DataFrame({"image": pd.Series(paths, dtype=str),
                         "width": pd.Series([r[0] for r in flat], dtype="int64"),
                         "height": pd.Series([r[1] for r in flat], dtype="int64"),
                         "reason": pd.Series([r[2] for r in flat], dtype=str)})


def cache_file(cache_dir, root, check_end: bool) -> Path:
    """One cache per image root (and end-marker setting), shared by every JSON using it."""
    key = hashlib.sha256(f"{Path(root).resolve()}|check_end={check_end}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"image_sizes-{key}.parquet"


def cached_scan(root, paths, cache_dir, *, rescan: bool = False, files_per_task: int = 1000,
                check_end: bool = True, progress=None):
    """Sizes of ``paths`` under ``root``: read from the cache in ``cache_dir`` where known,
    scanned (in parallel) where not, and the cache updated. ``rescan=True`` ignores it.
    Returns (DataFrame image,width,height,reason for exactly ``paths``, info dict)."""
    import pandas as pd

    path = cache_file(cache_dir, root, check_end)
    known = None
    if path.exists() and not rescan:
        try:
            known = pd.read_parquet(path)
        except Exception:  # noqa: BLE001 -- a damaged cache is rebuilt, never fatal
            known = None
    wanted = pd.Series(pd.unique(pd.Series(list(paths), dtype=str)), dtype=str)
    todo = wanted if known is None else wanted[~wanted.isin(known["image"])]
    t0 = time.perf_counter()
    fresh = scan_parallel(root, todo.tolist(), files_per_task, check_end, progress)
    scan_s = time.perf_counter() - t0
    table = fresh if known is None else pd.concat([known, fresh], ignore_index=True)
    if len(fresh):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    table = (table.drop_duplicates("image", keep="last").set_index("image").reindex(wanted.to_numpy())
             .rename_axis("image").reset_index())
    info = {"cache_file": str(path), "cache_hit": known is not None, "n_unique_images": len(wanted),
            "n_scanned": len(todo), "n_from_cache": len(wanted) - len(todo), "scan_s": round(scan_s, 3),
            "scan_images_per_s": round(len(todo) / scan_s, 1) if len(todo) and scan_s > 0 else None,
            "n_over_pil_pixel_limit": int(((table["width"] * table["height"]) > PIL_DEFAULT_MAX_PIXELS).sum())}
    return table, info
