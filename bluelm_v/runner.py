"""The device runner: one BlueLM-V case on ONNX Runtime, with nothing but the standard library,
numpy, onnxruntime and Pillow (it imports nothing of bluelm_v, so it is pushed to a phone or a
board as this one file and run with that device's Python).

    python -m bluelm_v.runner --export DIR --image IMG.png --prompt-ids IDS.json \\
        --grid 2:4 --tiles-per-batch 4 --prefill-chunk 128 --decode-tokens 32 [--int8 vision,llm]
    python3 bluelm_v_runner.py ...      # the same file on the device

DIR is an export made by the ``onnxruntime`` backend (plugins/backends/export.py): manifest.json
names its format and version, the graphs per shape (vision_b{B}: encoder + downsampler +
projector for B tiles; llm_r{R}_m{M}: one LLM step of R rows over a static KV buffer of M), the
token-embedding table, the image preprocessing and the vocabulary bytes. A runner and an export
of different versions refuse to run (exit 3, one line saying which versions).
The prompt ids come from the host (the tokenizer stays there); -200 marks the image.

Output, one metric per line (the format the ssh and adb backends parse):
    bluelm_v.load_s=...      reading the export + creating the sessions this case uses
    bluelm_v.encode_s=...    preprocessing + vision calls (tiles_per_batch tiles per call)
    bluelm_v.prefill_s=...   splice + chunked prefill up to the first token
    bluelm_v.ttft_s=...      encode + prefill
    bluelm_v.decode_tokens_per_s=...   bluelm_v.peak_rss_mb=...   bluelm_v.tokens=1,2,3
    bluelm_v.text=...        the answer (the ids decoded with the export's vocabulary bytes)
Errors: ``bluelm_v.error=...`` and a non-zero exit (2 bad input, 3 version mismatch).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

EXPORT_FORMAT = "bluelm_v-onnx-export"
EXPORT_VERSION = 1
IMAGE_TOKEN_ID = -200


class RunnerError(Exception):
    """Bad input or a mismatched export (exit code in ``code``)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def read_manifest(export_dir: str) -> dict:
    path = os.path.join(export_dir, "manifest.json")
    if not os.path.isfile(path):
        raise RunnerError(f"--export {export_dir}: no manifest.json (not an export of the onnxruntime backend)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != EXPORT_FORMAT:
        raise RunnerError(f"--export {export_dir}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}", 3)
    if manifest.get("version") != EXPORT_VERSION:
        raise RunnerError(f"--export {export_dir}: export version {manifest.get('version')} but this runner reads "
                          f"version {EXPORT_VERSION}; re-export with the same bluelm_v, or push its runner", 3)
    for name, size in manifest.get("files", {}).items():
        full = os.path.join(export_dir, name)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            raise RunnerError(f"--export {export_dir}: {name} is missing or has the wrong size (expected {size} bytes)", 3)
    return manifest


def cache_length(prompt_len: int, chunk: int, new_tokens: int) -> int:
    """The static KV buffer of a case: the prompt padded to whole chunks + the decoded tokens."""
    return -(-prompt_len // chunk) * chunk + max(new_tokens, 1)


def crop_count(grid: tuple[int, int], spec: dict) -> int:
    """Crops of a grid: the m*n tiles + the thumbnail unless the policy leaves it out."""
    m, n = grid
    thumb = spec.get("thumbnail", "first")
    return m * n + int(thumb != "none" and not (thumb == "auto" and m * n == 1))


# -- image preprocessing (the tiler's transform for a given grid) -----------------------------
def preprocess(image, grid: tuple[int, int], spec: dict):
    """PIL image + grid (m columns, n rows) -> pixels [K,3,B,B] float32, as the tiler named in
    ``spec`` makes them: canvas ``pad`` (aspect kept, centred on black) or ``stretch``, tiles
    row-major, the thumbnail ``first``, ``last``, ``auto`` (last, only with several tiles) or ``none``, then (x/255 - mean) / std."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    m, n = grid
    b = int(spec["tile_size"])
    w, h = image.size
    cw, ch = m * b, n * b
    if spec["canvas"] == "stretch":
        canvas = image.resize((cw, ch), Image.BICUBIC)
    elif spec["canvas"] == "pad":
        if cw / w <= ch / h:
            new_w, new_h = cw, min(max(1, -(-h * cw // w)), ch)
        else:
            new_w, new_h = min(max(1, -(-w * ch // h)), cw), ch
        canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((cw - new_w) // 2, (ch - new_h) // 2))
    else:
        raise RunnerError(f"export preprocess.canvas {spec['canvas']!r}: expected 'pad' or 'stretch'", 3)
    tiles = np.asarray(canvas, np.uint8).reshape(n, b, m, b, 3).transpose(0, 2, 4, 1, 3).reshape(n * m, 3, b, b)
    parts = [tiles]
    thumb = spec.get("thumbnail", "first")
    if crop_count(grid, spec) > m * n:
        small = np.asarray(image.resize((b, b), Image.BICUBIC), np.uint8).transpose(2, 0, 1)[None]
        parts = [small, tiles] if thumb == "first" else [tiles, small]
    pixels = np.concatenate(parts).astype(np.float32) / 255.0              # [K,3,B,B]
    mean = np.asarray(spec["mean"], np.float32)[None, :, None, None]
    std = np.asarray(spec["std"], np.float32)[None, :, None, None]
    return (pixels - mean) / std


# -- the pipeline -----------------------------------------------------------------------------
class Pipeline:
    """ONNX Runtime sessions over an export; one ``run`` per case."""

    def __init__(self, export_dir: str, threads: int = 0):
        import numpy as np

        t0 = time.perf_counter()
        self.dir, self.threads = export_dir, int(threads)
        self.manifest = read_manifest(export_dir)
        self.table = np.load(os.path.join(export_dir, self.manifest["embeddings"]), mmap_mode="r")   # [V, D]
        self.sessions: dict = {}
        self.load_s = time.perf_counter() - t0

    def session(self, name: str):
        """The session of graph file ``name``, created once (its creation counts to load_s)."""
        if name not in self.sessions:
            import onnxruntime as ort

            if name not in self.manifest.get("files", {}):
                raise RunnerError(f"the export has no graph {name}; export this shape first", 3)
            t0 = time.perf_counter()
            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            self.sessions[name] = ort.InferenceSession(os.path.join(self.dir, name), opts,
                                                       providers=["CPUExecutionProvider"])
            self.load_s += time.perf_counter() - t0
        return self.sessions[name]

    def graph_names(self, tiles_per_batch: int, chunk: int, max_len: int, int8: tuple = ()) -> tuple[str, str, str]:
        def name(base, part):
            return f"{base}.int8.onnx" if part in int8 else f"{base}.onnx"
        return (name(f"vision_b{tiles_per_batch}", "vision"), name(f"llm_r{chunk}_m{max_len}", "llm"),
                name(f"llm_r1_m{max_len}", "llm"))

    def prepare(self, tiles_per_batch: int, chunk: int, max_len: int, int8: tuple = ()):
        return tuple(self.session(n) for n in self.graph_names(tiles_per_batch, chunk, max_len, int8))

    def run(self, pixels, prompt_ids: list[int], tiles_per_batch: int, chunk: int, new_tokens: int,
            int8: tuple = (), started: float | None = None) -> dict:
        """pixels [K,3,B,B] float32 (or None when ``prompt_ids`` holds no image). ``started``:
        when encoding began (preprocessing included), else now."""
        import numpy as np

        per_crop = int(self.manifest["tokens_per_crop"])
        crops = 0 if pixels is None else len(pixels)
        length = len(prompt_ids) - prompt_ids.count(IMAGE_TOKEN_ID) + crops * per_crop
        max_len = cache_length(length, chunk, new_tokens)
        vision, prefill, decode = self.prepare(tiles_per_batch, chunk, max_len, int8)
        t0 = time.perf_counter() if started is None else started
        groups = []
        for s in range(0, crops, tiles_per_batch):
            g = pixels[s:s + tiles_per_batch]
            if len(g) < tiles_per_batch:                      # a fixed-shape graph: zero-pad the last group
                g = np.concatenate([g, np.zeros((tiles_per_batch - len(g),) + g.shape[1:], np.float32)])
            out = vision.run(None, {"pixels": g})[0]
            groups.append(out[: min(tiles_per_batch, crops - s) * per_crop])   # [g*T', D]
        features = np.concatenate(groups) if groups else np.zeros((0, self.table.shape[1]), np.float32)
        t_enc = time.perf_counter()
        embeds = self.splice(prompt_ids, features, max_len - max(new_tokens, 1))   # [1, L_pad, D]
        shape = tuple(prefill.get_inputs()[1].shape)                             # [L, KV, M, d]
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        for s in range(0, length, chunk):
            last = min(length - 1 - s, chunk - 1)
            logits, k, v = prefill.run(None, {"embeds": embeds[:, s:s + chunk], "k_cache": k, "v_cache": v,
                                              "start": np.array([s]), "last": np.array([last])})
        first_logits = logits[0]
        tokens = [int(first_logits.argmax())]
        t_first = time.perf_counter()
        for pos in range(length, length + new_tokens - 1):
            row = np.asarray(self.table[tokens[-1]], np.float32)[None, None]
            logits, k, v = decode.run(None, {"embeds": row, "k_cache": k, "v_cache": v,
                                             "start": np.array([pos]), "last": np.array([0])})
            tokens.append(int(logits[0].argmax()))
        t_end = time.perf_counter()
        return {"crops": crops, "visual_tokens": len(features), "prompt_tokens": length, "kv_cache_tokens": max_len,
                "encode_s": t_enc - t0, "prefill_s": t_first - t_enc, "ttft_s": t_first - t0,
                "prefill_tokens_per_s": length / max(t_first - t_enc, 1e-9), "decode_tokens": len(tokens),
                "decode_tokens_per_s": (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else None,
                "tokens": tokens, "features": features, "first_logits": first_logits}

    def splice(self, ids: list[int], features, padded_len: int):
        """Token embeddings with each image sentinel replaced by the visual tokens, zero-padded to
        ``padded_len`` rows: [1, padded_len, D]."""
        import numpy as np

        out = np.zeros((1, padded_len, self.table.shape[1]), np.float32)
        pos = 0
        for i in ids:
            if i == IMAGE_TOKEN_ID:
                out[0, pos:pos + len(features)] = features
                pos += len(features)
            else:
                out[0, pos] = self.table[i]
                pos += 1
        return out

    def decode_text(self, tokens: list[int]) -> str:
        pieces = self.manifest.get("vocab_bytes") or []
        data = b"".join(bytes.fromhex(pieces[t]) for t in tokens if 0 <= t < len(pieces))
        return data.decode("utf-8", errors="replace")


def peak_rss_mb() -> float:
    """This process's peak resident set (ru_maxrss is KiB on Linux and Android)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _grid(text: str) -> tuple[int, int]:
    try:
        m, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise RunnerError(f"--grid {text!r}: expected COLUMNS:ROWS such as 2:4") from None
    if m < 1 or n < 1:
        raise RunnerError(f"--grid {text!r}: both sides must be >= 1")
    return m, n


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bluelm_v.runner", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export directory (manifest.json + graphs)")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--grid", type=_grid, help="tile grid COLUMNS:ROWS chosen by the host's tiler")
    p.add_argument("--prompt-ids", required=True, help="JSON file with the prompt's token ids (-200 = the image)")
    p.add_argument("--tiles-per-batch", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--int8", default="", help="parts run with the INT8 graphs: vision, llm or vision,llm")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--version", action="version", version=f"bluelm_v runner, export version {EXPORT_VERSION}")
    return p.parse_args(argv)


def run_case(args) -> dict:
    for key in ("tiles_per_batch", "prefill_chunk"):
        if getattr(args, key) < 1:
            raise RunnerError(f"--{key.replace('_', '-')}: must be >= 1")
    if args.decode_tokens < 0:
        raise RunnerError("--decode-tokens: must be >= 0")
    int8 = tuple(p for p in args.int8.split(",") if p)
    if set(int8) - {"vision", "llm"}:
        raise RunnerError(f"--int8 {args.int8!r}: expected a subset of vision,llm")
    with open(args.prompt_ids) as f:
        ids = [int(i) for i in json.load(f)]
    pipe = Pipeline(args.export, args.threads)
    pixels, started = None, None
    if args.image:
        from PIL import Image

        if args.grid is None:
            raise RunnerError("--grid: needed with --image (the host's tiler chooses it)")
        image = Image.open(args.image)
        spec = pipe.manifest["preprocess"]
        length = len(ids) - ids.count(IMAGE_TOKEN_ID) + crop_count(args.grid, spec) * int(pipe.manifest["tokens_per_crop"])
        pipe.prepare(args.tiles_per_batch, args.prefill_chunk,           # sessions: outside the timed part
                     cache_length(length, args.prefill_chunk, args.decode_tokens), int8)
        started = time.perf_counter()
        pixels = preprocess(image, args.grid, spec)
    elif IMAGE_TOKEN_ID in ids:
        raise RunnerError("--prompt-ids: the prompt has an image placeholder but no --image was given")
    out = pipe.run(pixels, ids, args.tiles_per_batch, args.prefill_chunk, args.decode_tokens, int8, started)
    out["load_s"] = pipe.load_s
    out["text"] = pipe.decode_text(out["tokens"])
    return out


def format_metrics(out: dict) -> str:
    lines = [f"bluelm_v.export_version={EXPORT_VERSION}"]
    for key in ("load_s", "encode_s", "prefill_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                "crops", "visual_tokens", "prompt_tokens", "kv_cache_tokens", "decode_tokens", "peak_rss_mb"):
        if out.get(key) is not None:
            lines.append(f"bluelm_v.{key}={out[key]}")
    lines.append("bluelm_v.tokens=" + ",".join(str(t) for t in out["tokens"]))
    lines.append("bluelm_v.text=" + out["text"].replace("\n", "\\n"))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = run_case(args)
    except RunnerError as exc:
        print(f"bluelm_v.error={exc}", flush=True)
        return exc.code
    except (OSError, ValueError) as exc:
        print(f"bluelm_v.error={type(exc).__name__}: {exc}", flush=True)
        return 2
    out["peak_rss_mb"] = peak_rss_mb()
    print(format_metrics(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
