"""A device that runs the device runner (bluelm_v/runner.py) behind a transport (transport.py).

    RunnerBackend(transport, python="python3", remote_dir="bluelm_v", threads=0, timeout_s=600)

load():     reaches the device, reads its facts (CPU, cores, memory, temperature, OS), checks that
            its Python imports numpy, onnxruntime and Pillow, builds the configured model here and
            exports it (plugins/backends/export.py), pushes the export and the runner file.
run_case(): makes the case's graphs if the export lacks them and pushes what is new, pushes the
            case's image (PNG) and prompt ids, runs the runner with ``timeout_s``, parses its
            ``bluelm_v.<metric>=<value>`` lines (``parse_runner_kv``); adds the wall time of the
            command and the device's temperature before and after.
The case, image and prompt are the ones the in-process backends use (inputs.py), and the INT8
graphs run where the case's quantizer makes a part's weights integer (precision.py).
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from bluelm_v.errors import InputError

from .inputs import prompt_for, synthetic_image
from .precision import precision_plan
from .transport import TransportError, quote

RUNNER_FILE = "bluelm_v_runner.py"
CHECK_IMPORTS = ("import sys, numpy, onnxruntime, PIL; "
                 "print(sys.version.split()[0], numpy.__version__, onnxruntime.__version__, PIL.__version__)")


def parse_runner_kv(text: str) -> dict:
    """``bluelm_v.<key>=<value>`` lines -> metrics (numbers where they parse; ``tokens`` as ints)."""
    out: dict = {}
    for m in re.finditer(r"^bluelm_v\.([A-Za-z0-9_]+)=(.*)$", text, re.M):
        key, value = m.group(1), m.group(2).strip()
        if key == "tokens":
            out[key] = [int(t) for t in value.split(",") if t]
        elif re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", value, re.I):
            out[key] = float(value) if re.search(r"[.eE]", value) else int(value)
        else:
            out[key] = value.replace("\\n", "\n") if key == "text" else value
    return out


class RunnerBackend:
    """The device runner on a device reached through ``transport``."""

    kind = "real"

    def __init__(self, transport, python: str = "python3", remote_dir: str = "bluelm_v", threads: int = 0,
                 opset: int = 17, export_dir: str | None = None, timeout_s: float = 600.0, push: bool = True):
        self.transport, self.python, self.remote_dir = transport, python, remote_dir.rstrip("/")
        self.threads, self.opset, self.export_dir = int(threads), int(opset), export_dir
        self.timeout_s, self.push = float(timeout_s), push
        self.facts: dict = {}
        self.env: dict = {}
        self.pushed: dict[str, int] = {}
        self.export = None

    # -- set-up --------------------------------------------------------------------------------
    def _remote(self, name: str) -> str:
        return f"{self.remote_dir}/{name}"

    def _run(self, command: str, timeout: float | None = None, what: str = "command"):
        done = self.transport.run(command, timeout or self.timeout_s)
        if done.returncode != 0:
            error = re.search(r"^bluelm_v\.error=(.*)$", done.stdout, re.M)
            detail = error.group(1) if error else (done.stderr or done.stdout).strip()[-400:]
            raise InputError(f"{self.transport.name} {what} failed (exit {done.returncode}): {detail}")
        return done

    def load(self, cfg, registry) -> dict:
        from bluelm_v import runner
        from bluelm_v.model import BlueLMV

        from .export import Export

        t0 = time.perf_counter()
        self.transport.connect()
        self.facts = self.transport.facts()
        versions = self._run(f"{self.python} -c {quote(CHECK_IMPORTS)}", 120,
                             f"'{self.python}' importing numpy, onnxruntime and Pillow (install them on the device, "
                             f"or set backend.python)").stdout.split()
        self.env = dict(zip(("python", "numpy", "onnxruntime", "pillow"), versions))
        self._tmp = tempfile.TemporaryDirectory(prefix="bluelm_v_device_")
        directory = Path(self.export_dir) if self.export_dir else Path(self._tmp.name) / "export"
        self.model = BlueLMV.from_config(cfg, registry).float().eval()
        self.export = Export(self.model, directory, self.opset)
        self._run(f"mkdir -p {quote(self._remote('export'))} {quote(self._remote('case'))}", 60)
        if self.push:
            self.transport.push(runner.__file__, self._remote(RUNNER_FILE))
            self.pushed = self._remote_files()
            self._sync()
        self.load_s = time.perf_counter() - t0
        return {"load_s": self.load_s, **self.env, "device": self.facts}

    def _remote_files(self) -> dict[str, int]:
        """Export files already on the device (same model), by size; another model's are removed."""
        listing = self.transport.run(f"cd {quote(self._remote('export'))} && cat manifest.json", 60)
        try:
            remote = json.loads(listing.stdout) if listing.returncode == 0 else {}
        except ValueError:
            remote = {}
        if remote.get("fingerprint") == self.export.manifest["fingerprint"]:
            return dict(remote.get("files", {}))
        self._run(f"rm -rf {quote(self._remote('export'))} && mkdir -p {quote(self._remote('export'))}", 60)
        return {}

    def _sync(self) -> float:
        """Push the export files the device lacks, then the manifest; returns the seconds taken."""
        t0 = time.perf_counter()
        files = self.export.files()
        for name, size in files.items():
            if name != "manifest.json" and self.pushed.get(name) != size:
                self.transport.push(str(self.export.dir / name), self._remote(f"export/{name}"))
                self.pushed[name] = size
        self.transport.push(str(self.export.dir / "manifest.json"), self._remote("export/manifest.json"))
        return time.perf_counter() - t0

    def describe(self) -> dict:
        return {"backend": self.transport.name, "kind": self.kind, "compute_unit": "cpu", "runtime": "onnxruntime",
                **self.env, **{k: v for k, v in self.facts.items() if k != "temperature_c"}}

    # -- one case ------------------------------------------------------------------------------
    def case_files(self, case: dict) -> tuple[list[int], tuple[int, int], tuple[str, ...]]:
        """Write the case's image and prompt ids locally; make the graphs it needs."""
        from bluelm_v import chat
        from bluelm_v.runner import cache_length, crop_count

        plan = precision_plan(case.get("quantizer"))
        int8 = tuple(p for p, part in (("vision", "encoder"), ("llm", "llm")) if plan[part].weight_bits < 16)
        image = synthetic_image(*case["image"], seed=int(case.get("seed") or 0))
        grid = self.model.tiler.select(*image.size)
        visual = crop_count(grid, self.export.manifest["preprocess"]) * self.model.tokens_per_crop
        tok = self.model.tokenizer
        prompt, length = prompt_for(lambda p: len(chat.prompt_ids(tok, p)), visual, int(case["prompt_tokens"]))
        ids = chat.prompt_ids(tok, prompt)
        local = Path(self._tmp.name)
        image.save(local / "image.png")
        (local / "ids.json").write_text(json.dumps(ids))
        chunk, n_new = int(case["prefill_chunk"]), int(case["decode_tokens"])
        self.export.ensure(int(case["tiles_per_batch"]), chunk, cache_length(length, chunk, n_new), int8)
        return ids, grid, int8

    def command_for(self, case: dict, grid, int8) -> str:
        return (f"cd {quote(self.remote_dir)} && {self.python} {RUNNER_FILE} --export export "
                f"--image case/image.png --grid {grid[0]}:{grid[1]} --prompt-ids case/ids.json "
                f"--tiles-per-batch {int(case['tiles_per_batch'])} --prefill-chunk {int(case['prefill_chunk'])} "
                f"--decode-tokens {int(case['decode_tokens'])} --int8 '{','.join(int8)}' --threads {self.threads}")

    def run_case(self, case: dict) -> dict:
        ids, grid, int8 = self.case_files(case)
        push_s = self._sync()
        local = Path(self._tmp.name)
        self.transport.push(str(local / "image.png"), self._remote("case/image.png"))
        self.transport.push(str(local / "ids.json"), self._remote("case/ids.json"))
        before = self.transport.facts().get("temperature_c")
        t0 = time.perf_counter()
        done = self._run(self.command_for(case, grid, int8), what="runner")
        wall = time.perf_counter() - t0
        metrics = parse_runner_kv(done.stdout)
        if "ttft_s" not in metrics:
            raise TransportError(f"{self.transport.name}: the runner printed no metrics; last output: "
                                 f"{done.stdout.strip()[-300:]!r}", retryable=False)
        metrics.update({"grid": "{}:{}".format(*grid), "peak_memory_mb": metrics.get("peak_rss_mb"), "wall_s": wall,
                        "push_s": push_s, "thermal_before_c": before,
                        "thermal_after_c": self.transport.facts().get("temperature_c"),
                        "ort_weights": {p: "int8" if p in int8 else "fp32" for p in ("vision", "llm")},
                        "simulated": False})
        return metrics

    def close(self) -> None:
        self.transport.close()
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None
