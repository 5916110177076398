"""The launcher as a user runs it: errors before work, summary.json in hydra.run.dir."""
from __future__ import annotations

import json
import subprocess
import sys

LAUNCH = [sys.executable, "-m", "bluelm_v.launch"]


def test_unknown_component_is_one_line_error_and_no_work(tmp_path):
    out = subprocess.run([*LAUNCH, "+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}", "tiler.name=relaxd"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "tiler: no tiler named 'relaxd'" in out.stderr and "Did you mean 'relaxed'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "summary.json").exists()  # failed before any work started


def test_bad_parameter_names_key_path(tmp_path):
    out = subprocess.run([*LAUNCH, "+experiment=ablate_tiling", f"hydra.run.dir={tmp_path}", "+tiler.alpah=0.3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "tiler.alpah: unknown parameter" in out.stderr


def test_unknown_job_lists_jobs(tmp_path):
    out = subprocess.run([*LAUNCH, f"hydra.run.dir={tmp_path}", "job.name=nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "job.name: no job 'nope'" in out.stderr and "ablate_tiling" in out.stderr


def test_launch_writes_summary_in_run_dir(tmp_path):
    manifest = tmp_path / "sizes.csv"
    manifest.write_text("width,height\n394,390\n380,76\n380,393\n500,102\n")
    run_dir = tmp_path / "run"
    out = subprocess.run([*LAUNCH, "+experiment=ablate_tiling", f"hydra.run.dir={run_dir}",
                          f"dataset.manifest={manifest}", "ray.num_cpus=1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"summary: {run_dir / 'summary.json'}" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["job"] == "ablate_tiling" and summary["n_images"] == 4
    assert (run_dir / "config.yaml").exists()
