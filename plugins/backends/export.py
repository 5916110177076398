"""The versioned export directory the device runner reads (bluelm_v/runner.py).

    ex = Export(model, "export/", opset=17)          # model: a built BlueLMV (fp32, eval)
    new = ex.ensure(tiles_per_batch=4, chunk=128, max_len=2080, int8=("llm",))   # graphs this case needs
    ex.files()                                         # {name: size}: what a transport pushes

Layout: manifest.json (format, version, the model's fingerprint, tokens per crop, the image
preprocessing, the vocabulary as bytes, every file with its size), embeddings.npy (the LLM's
input embeddings [V, D] as ``llm.embed`` returns them), vision_b{B}.onnx and llm_r{R}_m{M}.onnx
(plugins/backends/onnx_export.py; static shapes, one per tiles-per-batch / chunk / KV length,
made when first needed) and their ``.int8.onnx`` variants (ONNX Runtime's dynamic INT8
quantisation, MatMulInteger). A directory holding another model's export (other fingerprint)
is cleared of it first. The runner refuses an export of another version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from bluelm_v.errors import ConfigError
from bluelm_v.runner import EXPORT_FORMAT, EXPORT_VERSION, preprocess


def fingerprint(model) -> str:
    """Shapes and leading bytes of every parameter: two builds of the same weights agree."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        t = p.detach().float().flatten()[:1024].cpu().numpy()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(t.tobytes())
    return h.hexdigest()[:16]


def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1 bytes
    stand for themselves, the others for chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for (special tokens: none), for decoding on the device."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        return [bytes([i]) if i < 256 else b"" for i in range(tokenizer.vocab_size)]
    decoder = {c: b for b, c in byte_alphabet().items()}
    special = set(getattr(hf, "all_special_ids", []) or [])
    out = []
    for i in range(len(hf)):
        piece = hf.convert_ids_to_tokens(i)
        if i in special or piece is None:
            out.append(b"")
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:     # sentencepiece byte
            out.append(bytes([int(piece[3:5], 16)]))
        elif all(c in decoder for c in piece):                                         # byte-level BPE
            out.append(bytes(decoder[c] for c in piece))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def preprocess_spec(tiler) -> dict:
    """How the runner reproduces ``tiler.transform`` for a given grid; checked on a test image
    (a tiler whose crops the runner cannot reproduce is refused)."""
    import numpy as np

    from .inputs import synthetic_image

    probe = synthetic_image(53, 101, seed=1)
    m, n = tiler.select(*probe.size)
    want = tiler.transform(probe).pixels.float().numpy()                      # [K,3,B,B]
    for canvas in ("pad", "stretch"):
        spec = {"tile_size": int(tiler.tile_size), "canvas": canvas, "thumbnail": getattr(tiler, "thumbnail", "first"),
                "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
        got = preprocess(probe, (m, n), spec)
        if got.shape == want.shape and float(np.abs(got - want).max()) < 1e-5:
            return spec
    raise ConfigError(f"tiler {type(tiler).__name__}: its crops are neither a padded nor a stretched canvas with "
                      f"mean = std = 0.5; the device runner cannot reproduce them")


class Export:
    """Writes and extends one export directory for one model."""

    def __init__(self, model, directory, opset: int = 17):
        self.model, self.dir, self.opset = model, Path(directory), int(opset)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hf = model.llm.model
        self.made_s: dict[str, float] = {}            # seconds to export/quantise each graph made here
        self.manifest = self._open()

    # -- the manifest ------------------------------------------------------------------------
    def _open(self) -> dict:
        import numpy as np
        import torch

        fp = fingerprint(self.model)
        path = self.dir / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {}
            if old.get("fingerprint") == fp and old.get("version") == EXPORT_VERSION:
                return old
            for name in old.get("files", {}):
                (self.dir / name).unlink(missing_ok=True)
        with torch.no_grad():
            ids = torch.arange(self.hf.get_input_embeddings().weight.shape[0])
            table = self.model.llm.embed(ids[None])[0].float().cpu().numpy()      # [V, D]
        np.save(self.dir / "embeddings.npy", table)
        manifest = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "fingerprint": fp, "opset": self.opset,
                    "tokens_per_crop": int(self.model.tokens_per_crop), "hidden_size": int(table.shape[1]),
                    "preprocess": preprocess_spec(self.model.tiler), "embeddings": "embeddings.npy",
                    "vocab_bytes": [b.hex() for b in token_bytes(self.model.tokenizer)], "files": {}}
        self._save(manifest, ["embeddings.npy"])
        return manifest

    def _save(self, manifest: dict, new_files: list[str]) -> None:
        for name in new_files:
            manifest["files"][name] = os.path.getsize(self.dir / name)
        tmp = self.dir / f"manifest.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, self.dir / "manifest.json")

    def files(self) -> dict[str, int]:
        return {"manifest.json": os.path.getsize(self.dir / "manifest.json"), **self.manifest["files"]}

    # -- graphs ------------------------------------------------------------------------------
    def _graph(self, base: str, export, int8: bool) -> list[str]:
        import time

        made = []
        fp32 = f"{base}.onnx"
        if fp32 not in self.manifest["files"]:
            t0 = time.perf_counter()
            export(self.dir / fp32)
            self.made_s[fp32] = time.perf_counter() - t0
            made.append(fp32)
        if int8 and f"{base}.int8.onnx" not in self.manifest["files"]:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            t0 = time.perf_counter()
            logging.disable(logging.WARNING)     # it logs every tensor whose type it cannot infer
            try:
                quantize_dynamic(str(self.dir / fp32), str(self.dir / f"{base}.int8.onnx"), weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
            self.made_s[f"{base}.int8.onnx"] = time.perf_counter() - t0
            made.append(f"{base}.int8.onnx")
        return made

    def ensure(self, tiles_per_batch: int, chunk: int, max_len: int, int8: tuple = ()) -> list[str]:
        """Export the graphs a case of this shape needs; returns the files made now."""
        from .onnx_export import export_llm_step, export_vision

        model, hf, opset = self.model, self.hf, self.opset
        made = self._graph(f"vision_b{tiles_per_batch}", lambda p: export_vision(model, tiles_per_batch, p, opset),
                           "vision" in int8)
        for rows in dict.fromkeys((chunk, 1)):
            made += self._graph(f"llm_r{rows}_m{max_len}", lambda p, r=rows: export_llm_step(hf, r, max_len, p, opset),
                                "llm" in int8)
        if made:
            self._save(self.manifest, made)
        return made
