"""A metrics logger: the job's start, metrics, images and end as lines of RUN_DIR/fixture_events.jsonl."""
import json
from pathlib import Path

from bluelm_v import hookimpl

_RUN = {"dir": None}


def _write(record: dict) -> None:
    if _RUN["dir"] is not None:
        with open(Path(_RUN["dir"]) / "fixture_events.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


@hookimpl
def bluelm_v_job_start(job, config, run_dir):
    _RUN["dir"] = run_dir
    _write({"event": "start", "job": job, "tiler": (config.get("tiler") or {}).get("name")})


@hookimpl
def bluelm_v_log_metrics(metrics, step):
    _write({"event": "metrics", "step": step, "metrics": metrics})


@hookimpl
def bluelm_v_log_images(images, step):
    _write({"event": "images", "step": step, "images": images})


@hookimpl
def bluelm_v_job_end(job, summary, run_dir, status):
    _write({"event": "end", "job": job, "status": status})
    _RUN["dir"] = None
