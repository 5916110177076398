"""Quantised checkpoints: safetensors files with a settings header, streamed both ways.

    save_quantized(module, "llm.safetensors", settings={"quantizer": "w4", ...}, part="llm")
    tensors = read_quantized("llm.safetensors", settings, expected=module.state_dict())
    load_quantized(module, "llm.safetensors", settings)      # check everything, then assign

The file is standard safetensors (any safetensors reader opens it). ``__metadata__`` holds
``format``, ``settings`` (JSON of the quantizer's settings), ``part``, ``aliases`` (tensors
shared between names, e.g. a tied embedding and lm_head, are stored once) and ``crc32`` (one
checksum per stored tensor, so flipped bytes are caught, not only truncation).

Tensors are written and read one at a time straight from/into their own memory (no mmap, no
second copy of the file in RAM). Loading checks, before anything is assigned to the module:
the header parses, offsets fit the file, the settings equal the ones asked for, every expected
name is present with the same shape and dtype and nothing else is, and every checksum matches.
Any failure raises :class:`bluelm_v.errors.InputError` naming the file and the problem; the
module is left exactly as it was.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Mapping

import torch

from bluelm_v.errors import InputError

FORMAT = "bluelm_v.quant/1"
MAX_HEADER = 64 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _bytes_view(t: torch.Tensor):
    """A writable numpy uint8 view of a contiguous CPU tensor's memory (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else memoryview(b"")


def _dedup(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    unique, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t
    return unique, aliases


def save_quantized(module_or_state, path: str | Path, settings: dict, part: str = "") -> dict:
    """Write a module's state dict (or a dict of tensors) atomically; returns {bytes, tensors}."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    tensors, aliases = _dedup(state)
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    header, offset, crcs = {}, 0, {}
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        crcs[name] = zlib.crc32(_bytes_view(t)) if n else 0
        offset += n
    header["__metadata__"] = {"format": FORMAT, "settings": json.dumps(settings, sort_keys=True),
                              "part": part, "aliases": json.dumps(aliases), "crc32": json.dumps(crcs)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                    # keep tensor data 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(_bytes_view(t))
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "tensors": len(tensors), "aliases": len(aliases)}


def read_header(path: str | Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start offset); InputError when it is not a readable
    bluelm-v quantised checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: quantised checkpoint does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: corrupted safetensors file ({size} bytes, no header)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(MAX_HEADER, size - 8):
            raise InputError(f"{path}: corrupted safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
            meta = header.pop("__metadata__", {}) or {}
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise InputError(f"{path}: corrupted safetensors header ({exc})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a bluelm-v quantised checkpoint (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    data_len = size - 8 - n
    try:
        spans = sorted((tuple(e["data_offsets"]), name, e) for name, e in header.items())
        end = 0
        for (lo, hi), name, e in spans:
            itemsize = torch.empty(0, dtype=_DTYPES[e["dtype"]]).element_size()
            numel = 1
            for d in e["shape"]:
                numel *= int(d)
            if lo != end or hi - lo != numel * itemsize:
                raise InputError(f"{path}: corrupted safetensors file (tensor {name} at bytes {lo}..{hi} "
                                 f"does not match its shape {e['shape']} / dtype {e['dtype']})")
            end = hi
        if end != data_len:
            raise InputError(f"{path}: corrupted or truncated safetensors file (tensors need {end} bytes "
                             f"of data, the file has {data_len})")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: corrupted safetensors header ({type(exc).__name__}: {exc})") from None
    return header, meta, 8 + n


def _settings_diff(saved: dict, asked: dict) -> str:
    keys = sorted(set(saved) | set(asked))
    return "; ".join(f"{k}: saved {saved.get(k, '<absent>')!r}, asked {asked.get(k, '<absent>')!r}"
                     for k in keys if saved.get(k, "<absent>") != asked.get(k, "<absent>"))


def read_quantized(path: str | Path, settings: dict | None,
                   expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (aliases resolved), after all the checks in the module docstring.
    ``settings`` None skips the settings check; ``expected`` (name -> tensor, meta is fine) checks
    names, shapes and dtypes."""
    path = Path(path)
    header, meta, start = read_header(path)
    saved = json.loads(meta.get("settings", "{}"))
    if settings is not None and saved != json.loads(json.dumps(settings, sort_keys=True)):
        raise InputError(f"{path}: saved with other quantizer settings ({_settings_diff(saved, settings)}); "
                         f"re-run the quantize step with these settings or load with the saved ones")
    aliases = json.loads(meta.get("aliases", "{}"))
    crcs = json.loads(meta.get("crc32", "{}"))
    names = set(header) | set(aliases)
    if expected is not None:
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        wrong = [f"{k} (file {header[k]['dtype']} {header[k]['shape']}, model {_NAMES.get(t.dtype)} {list(t.shape)})"
                 for k, t in expected.items() if k in header and
                 (header[k]["dtype"] != _NAMES.get(t.dtype) or list(header[k]["shape"]) != list(t.shape))]
        if missing or extra or wrong:
            parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                     f"mismatched {wrong[:5]}" if wrong else ""]
            raise InputError(f"{path}: does not fit this model: " + "; ".join(p for p in parts if p))
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty([int(d) for d in e["shape"]], dtype=_DTYPES[e["dtype"]])
            if t.numel():
                f.seek(start + e["data_offsets"][0])
                view = _bytes_view(t)
                if f.readinto(view) != len(view):
                    raise InputError(f"{path}: truncated while reading {name}")
                if name in crcs and zlib.crc32(view) != crcs[name]:
                    raise InputError(f"{path}: corrupted data in tensor {name} (checksum mismatch)")
            out[name] = t
    for alias, target in aliases.items():
        out[alias] = out[target]
    return out


def load_quantized(module: torch.nn.Module, path: str | Path, settings: dict | None) -> dict:
    """Read and check everything, then assign all tensors at once (a meta-device module gets real
    tensors; a materialised one has its tensors replaced). Returns {bytes, tensors}."""
    expected = module.state_dict(keep_vars=True)
    tensors = read_quantized(path, settings, expected)
    module.load_state_dict(tensors, strict=True, assign=True)
    return {"bytes": Path(path).stat().st_size, "tensors": len(tensors)}


def saved_settings(path: str | Path) -> dict:
    """The quantizer settings recorded in a checkpoint's header."""
    return json.loads(read_header(path)[1].get("settings", "{}"))
