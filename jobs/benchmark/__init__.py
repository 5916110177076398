"""Device benchmark: fan a case grid out to devices (this host, simulated phones, real phones).

    python -m bluelm_v.launch +experiment=benchmark                       # host + 2 simulated Dimensity 9300
    python -m bluelm_v.launch +experiment=benchmark hydra.run.dir=/tmp/bench ray.num_cpus=2
    python -m bluelm_v.launch +experiment=benchmark hydra.run.dir=/tmp/bench   # again: skips finished cases
    python -m bluelm_v.launch +experiment=benchmark job.discover_adb=true \
        'job.adb_defaults={runner: ./bluelm_runner, model_dir: ./export}'    # + every attached phone
    python -m bluelm_v.launch +experiment=benchmark 'job.cases.vary={tiles_per_batch: [1,2,4,6]}' job.trials=5

One Ray actor per device (jobs/benchmark/worker.py) loads its backend once and runs one case at
a time: warm-up, N trials, a stability check, an optional cool-down. Each finished case is
appended to RUN_DIR/results.jsonl at once; a rerun with the same run directory skips the cases
already there. An actor that dies or hangs past ``job.case_timeout_s`` is replaced and its case
retried once on that device, then recorded as failed with the error; so is a case whose device
was lost (an ssh board that stopped answering, a phone unplugged), and a resumed run repeats
those. The summary's status is ``ok`` (every case ok), ``partial`` (some failed: counts in
``reason``) or ``failed`` (every case failed: the errors in ``reason``). Outputs: results.jsonl,
summary.json, report.md (a Table-5-like table per device, the base case in the columns of the AI
Hub / ExecuTorch benchmarks, the same case on every device side by side, sweeps),
benchmark_results.json (ExecuTorch's benchmark records), encode_vs_tiles_per_batch.png,
prefill_vs_chunk.png, devices_compare.png.
"""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

from bluelm_v.jobs.benchmark import cases as case_grid
from bluelm_v.jobs.benchmark import report
from bluelm_v.jobs.benchmark.scheduler import Fanout
from bluelm_v.jobs.benchmark.store import ResultStore
from bluelm_v.errors import ConfigError
from bluelm_v.job import write_json

# The top-level nodes this job reads (bluelm_v.launch refuses overrides of the others): the
# model the host backends build; quantizers come from the cases, backends from job.devices.
USES = ("tiler", "encoder", "downsampler", "projector", "llm", "engine")   # engine: local_torch devices
OPEN_NODES = ("job.cases",)   # case fields are checked by cases.check_case

PROTOCOL_KEYS = ("warmup", "trials", "max_spread", "extra_trials", "cool_down_s")


def actor_prefix(run_dir) -> str:
    """Actor names of a run: '{prefix}-{device}-{generation}' (unique per run directory)."""
    return "bench-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]


def validate(cfg, registry) -> None:
    job = cfg.job
    devices = case_grid.inventory(job, [])
    case_grid.expand(job.cases, None, "job.cases")
    for dev in devices:
        registry.validate_node("backend", dev["backend"], f"job.devices[{dev['name']}].backend")
        for case in case_grid.expand(job.cases, dev["cases"], f"job.devices[{dev['name']}].cases"):
            _check_quantizer(case.get("quantizer"), registry, f"job.cases ({case['id']}).quantizer")
    for key in ("trials", "case_timeout_s", "load_timeout_s"):
        if not (isinstance(job.get(key), (int, float)) and job.get(key) > 0):
            raise ConfigError(f"job.{key}: expected a positive number, got {job.get(key)!r}")
    if job.get("warmup", 0) < 0 or job.get("retries", 1) < 0:
        raise ConfigError("job.warmup / job.retries: must be >= 0")


def _check_quantizer(q, registry, path: str) -> None:
    """Each quantizer node of a case is a registered quantizer with valid parameters (a node
    with an explicit ``precision`` plan is for the cost model only and is not checked here)."""
    nodes = [] if q is None else q if isinstance(q, (list, tuple)) else [q]
    for node in nodes:
        node = {"name": node} if isinstance(node, str) else node
        if "precision" not in node:
            registry.validate_node("quantizer", node, path)


def outcome(ok: int, failed: int, total: int, records: list[dict]) -> dict:
    """The job's status: ok, partial (with counts) or failed (with the errors)."""
    errors = list(dict.fromkeys(str(r.get("error")) for r in records if r["status"] == "failed"))
    said = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} other errors" if len(errors) > 3 else "")
    if failed == 0 and ok == total:
        return {"status": "ok"}
    if ok == 0:
        return {"status": "failed", "reason": f"every case failed ({failed} of {total}): {said}"}
    return {"status": "partial", "reason": f"{failed} of {total} cases failed, {ok} ok: {said}"}


def run(ctx) -> dict:
    job, run_dir = ctx.cfg.job, ctx.run_dir
    config = OmegaConf.to_container(ctx.cfg, resolve=True)
    devices = case_grid.inventory(job, ctx.pm.hook.bluelm_v_devices(config=config))
    for dev in devices[len(job.devices):]:           # hook devices were not validated yet
        ctx.registry.validate_node("backend", dev["backend"], f"device {dev['name']} (bluelm_v_devices).backend")
    grids = {d["name"]: case_grid.expand(job.cases, d["cases"], f"job.devices[{d['name']}].cases") for d in devices}
    bases = {name: cases[0] for name, cases in grids.items()}

    store = ResultStore(run_dir / "results.jsonl")
    done = store.finished(("ok",) if job.get("rerun_failed") else ("ok", "failed"), keep_retryable=False)
    work = {name: [c for c in cases if (name, c["id"]) not in done] for name, cases in grids.items()}
    total, todo = sum(map(len, grids.values())), sum(map(len, work.values()))
    print(f"benchmark: {len(devices)} devices, {total} cases, {total - todo} already in {store.path.name}, {todo} to run")

    bar = ctx.progress(total=todo, desc="cases", unit="case")

    def on_record(rec: dict) -> None:
        bar.update(1)
        m = rec.get("metrics") or {}
        ctx.log_metrics({f"{rec['device']}/{k}": v for k, v in m.items()
                         if k in ("encode_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_memory_mb")})
        if rec["status"] != "ok":
            print(f"benchmark: {rec['device']} {rec['case_id']} failed: {rec['error']}")

    protocol = {k: job.get(k) for k in PROTOCOL_KEYS if job.get(k) is not None}
    fan = Fanout(devices, config, protocol, store, case_timeout_s=job.case_timeout_s,
                 load_timeout_s=job.load_timeout_s, retries=job.get("retries", 1), prefix=actor_prefix(run_dir))
    counts = fan.run(work, on_record=on_record)
    bar.close()

    latest = {}
    for rec in store.read():                        # the last record of a (device, case) wins
        latest[(rec["device"], rec["case_id"])] = rec
    wanted = {(name, c["id"]) for name, cases in grids.items() for c in cases}
    records = [r for key, r in latest.items() if key in wanted]
    loads = fan.device_info()
    per_device = {d["name"]: {**report.device_summary(d["name"], records, bases[d["name"]]), **loads[d["name"]]}
                  for d in devices}
    rows = report.anchor_rows(records, loads)
    model = "{}+{}".format((config.get("encoder") or {}).get("preset", "?"), (config.get("llm") or {}).get("preset", "?"))
    write_json(run_dir / "benchmark_results.json", report.executorch_records(rows, model))
    base_ids = {name: c["id"] for name, c in bases.items()}
    pictures = {**report.plots(records, bases, run_dir), **report.comparison_plot(rows, base_ids, run_dir)} \
        if job.get("plots", True) else {}
    ctx.log_images(pictures)
    header = (f"{len(devices)} devices, {len(records)} of {total} cases recorded; protocol: "
              + ", ".join(f"{k}={v}" for k, v in protocol.items()) + f"; results: {store.path.name}")
    report.write_report(run_dir / "report.md", per_device, records, bases, pictures, header,
                        anchors=report.anchor_table(rows, base_ids) + "\n\n" + report.same_case_table(records, base_ids))
    findings = {name: {k: s[k] for k in ("best_tiles_per_batch", "best_prefill_chunk") if k in s}
                for name, s in per_device.items()}
    ok, failed = sum(s["ok"] for s in per_device.values()), sum(s["failed"] for s in per_device.values())
    return {**outcome(ok, failed, total, records), "cases": total, "ok": ok, "failed": failed,
            "skipped_finished": total - todo,
            "ran": todo, "retried": counts["retried"], "actor_restarts": counts["actor_restarts"],
            "devices": per_device, "findings": findings, "results": str(store.path),
            "report": str(run_dir / "report.md"), "plots": pictures}
