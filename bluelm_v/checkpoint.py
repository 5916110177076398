"""Model checkpoints: the weights of every trained part and the config they were trained with.

    info = export_train_checkpoint(cfg, summary, RUN/"checkpoint")   # the train job, at its end
    model, info = load_checkpoint(DIR, registry, device="cuda")      # evaluate, generate, lmms-eval
    nodes = checkpoint_config(DIR)                                    # {"tiler": ..., "encoder": ...}

A checkpoint directory holds:

    config.yaml          the model's component nodes (tiler, encoder, downsampler, projector,
                         llm: registered names + plain values) and the training seed
    model.safetensors    after stage 2: every part's weights (tied copies stored once), or
    projector.safetensors  after stage 1 alone: projector + downsampler; the encoder and the LLM
                         are then their seeded initial weights (rebuilt from config.yaml + seed)
    checkpoint.json      format version, the weight file, parts trained, stages, tensor shapes

Loading rebuilds the pipeline from config.yaml exactly as training built it (``torch.manual_seed
(seed)`` then ``BlueLMV.from_config``), checks every tensor's name and shape against that model
and stops at the first difference with one line naming the tensor and both shapes (a
ConfigError: the launcher prints it and exits 2). torch and safetensors are imported only by
the functions that need them.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from .errors import ConfigError

FORMAT = "bluelm_v.checkpoint/1"
PARTS = ("encoder", "downsampler", "projector", "llm")
CONFIG_FILE, INFO_FILE = "config.yaml", "checkpoint.json"


def _plain(node):
    if node is None or isinstance(node, (str, int, float, bool)):
        return node
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """Names and shapes of a .safetensors file, read from its header (no weights loaded)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise ConfigError(f"checkpoint {path.parent}: {path.name} is not a readable safetensors file ({exc})") from None
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_train_checkpoint(cfg, summary: dict, out_dir: str | Path) -> dict | None:
    """Write ``out_dir`` from a finished train run (its composed ``cfg`` and the summary its
    run() returns). Returns the checkpoint's info, or None when the run kept no weights of its
    last stage (``train.save_model: false`` with stage 2)."""
    import yaml

    stages = list(summary.get("stages_run") or [])
    if not stages:
        return None
    last = stages[-1]
    result = summary.get(f"stage{last}") or {}
    source = result.get("model") if last == 2 else result.get("projector")
    if not source or not Path(source).is_file():
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiler = cfg.train[f"stage{last}"].get("tiler") or cfg.tiler
    nodes = {"tiler": _plain(tiler), **{p: _plain(cfg[p]) for p in PARTS},
             "seed": int(cfg.train.seed), "stages": stages}
    weights = out / Path(source).name
    _link_or_copy(Path(source), weights)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(nodes, sort_keys=False))
    trained = ["encoder", "downsampler", "projector", "llm"] if last == 2 else ["downsampler", "projector"]
    info = {"format": FORMAT, "weights": weights.name, "trained_parts": trained, "stages": stages,
            "final_loss": result.get("final_loss"), "steps": result.get("steps"),
            "tensors": tensor_shapes(weights)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return {k: v for k, v in info.items() if k != "tensors"} | {"path": str(out)}


def checkpoint_info(directory: str | Path) -> dict:
    """checkpoint.json of a checkpoint directory (ConfigError naming what is missing)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"checkpoint: {str(d)!r} is not a directory (a train run's RUN_DIR/checkpoint)")
    for name in (CONFIG_FILE, INFO_FILE):
        if not (d / name).is_file():
            raise ConfigError(f"checkpoint {d}: no {name}; point checkpoint= at the folder a train run writes "
                              f"(RUN_DIR/checkpoint)")
    info = json.loads((d / INFO_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {d}: format {info.get('format')!r}, this version reads {FORMAT!r}")
    if not (d / info["weights"]).is_file():
        raise ConfigError(f"checkpoint {d}: weight file {info['weights']} is missing")
    return info


def checkpoint_config(directory: str | Path) -> dict:
    """The component nodes (and seed) the checkpoint's weights were trained with."""
    import yaml

    checkpoint_info(directory)
    nodes = yaml.safe_load((Path(directory) / CONFIG_FILE).read_text()) or {}
    missing = [p for p in ("tiler", *PARTS) if not nodes.get(p)]
    if missing:
        raise ConfigError(f"checkpoint {directory}: {CONFIG_FILE} has no {missing[0]} node")
    return nodes


def check_shapes(directory: str | Path, weights: str, stored: dict[str, list[int]], wanted: dict[str, list[int]],
                 optional: set[str] = frozenset()) -> None:
    """ConfigError at the first tensor whose name or shape differs between the weight file and
    the model built from config.yaml (``optional``: names the file may omit, e.g. tied copies)."""
    where = f"checkpoint {directory}: {weights}"
    for name, shape in stored.items():
        if name not in wanted:
            raise ConfigError(f"{where} has tensor {name} {shape} that the model built from {CONFIG_FILE} does not have")
        if list(wanted[name]) != list(shape):
            raise ConfigError(f"{where} has {name} of shape {list(shape)}, the model built from {CONFIG_FILE} "
                              f"needs {list(wanted[name])}")
    for name in wanted:
        if name not in stored and name not in optional:
            raise ConfigError(f"{where} lacks tensor {name} {list(wanted[name])} that the model built from "
                              f"{CONFIG_FILE} needs")


def load_checkpoint(directory: str | Path, registry, device: str | None = None, dtype=None):
    """(BlueLMV with its tiler, info) rebuilt from ``directory``; weights checked, then loaded.
    ``dtype`` (a torch dtype) casts floating-point weights after loading."""
    import torch
    from safetensors.torch import load_file

    from .model import BlueLMV

    info = checkpoint_info(directory)
    nodes = checkpoint_config(directory)
    torch.manual_seed(int(nodes.get("seed", 0)))           # the init training started from
    model = BlueLMV.from_config(nodes, registry)
    prefixes = tuple(f"{p}." for p in (PARTS if info["weights"] == "model.safetensors" else ("projector", "downsampler")))
    wanted = {k: list(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}
    path = Path(directory) / info["weights"]
    check_shapes(directory, info["weights"], tensor_shapes(path), wanted, optional=tied_names(model))
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = [k for k in missing if k.startswith(prefixes) and k not in tied_names(model)]
    if absent or unexpected:
        raise ConfigError(f"checkpoint {directory}: {info['weights']} does not fit the model "
                          f"(missing {absent[:3]}, unexpected {list(unexpected)[:3]})")
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), dict(info, path=str(directory), config=nodes)


def tied_names(module) -> set[str]:
    """state_dict names that share storage with an earlier name (tied weights, stored once)."""
    seen, dup = set(), set()
    for k, v in module.state_dict(keep_vars=True).items():
        key = (v.data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and key in seen:
            dup.add(k)
        seen.add(key)
    return dup
