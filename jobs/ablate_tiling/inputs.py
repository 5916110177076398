"""The samples a tiling ablation decides: a size manifest, the embedded COCO sizes, or a
LLaVA-format JSON whose image headers are scanned (bluelm_v.data); every row that cannot be
used is kept with its reason for skipped.csv."""
from __future__ import annotations

from pathlib import Path

from bluelm_v.errors import ConfigError

_PARSED: dict = {}


def read_manifest(path):
    """read_size_manifest, parsed once per (path, mtime) in this process (validate, then run)."""
    from bluelm_v.data.manifest import read_size_manifest

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


def load_samples(ctx):
    """(samples with width/height, skipped rows with a reason, dataset info)."""
    import pandas as pd

    from bluelm_v.data import manifest as mf

    ds = ctx.cfg.dataset
    if ds.get("llava_json"):
        from bluelm_v.data.llava_sizes import llava_samples

        cache_dir = Path(ds.cache_dir) if ds.get("cache_dir") else ctx.run_dir.resolve().parent / "size_cache"
        samples, skipped, info = llava_samples(
            ds.llava_json, ds.image_root, cache_dir, rescan=bool(ds.get("rescan", False)),
            files_per_task=int(ds.get("files_per_task", 1000)), check_end=bool(ds.get("check_end", True)),
            progress=ctx.progress)
        info = {"kind": "llava_json", "path": str(ds.llava_json), "image_root": str(ds.image_root),
                "row_means": "record index (.json) or line (.jsonl)", **info}
    else:
        table = read_manifest(ds.get("manifest"))
        embedded = not ds.get("manifest")
        info = {"kind": "embedded_coco2017_train" if embedded else "manifest",
                "path": mf.COCO_TRAIN2017_FILE if embedded else str(ds.manifest),
                "row_means": "line of the manifest file (header = line 1)"}
        samples, skipped = mf.split_bad_sizes(table.rename(columns={"line": "row"}))
    good, bad = mf.split_bad_sizes(samples)
    skipped = pd.concat([skipped, bad], ignore_index=True)
    info["n_input_rows"] = int(len(good) + len(skipped))
    return good, skipped, info


def write_skipped(path: Path, skipped) -> None:
    cols = [c for c in ("row", "id", "image", "source", "width", "height", "reason", "detail") if c in skipped.columns]
    tmp = path.with_suffix(".csv.tmp")
    skipped[cols].to_csv(tmp, index=False)
    tmp.replace(path)
