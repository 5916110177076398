"""Cluster use as the README documents it: a real Ray head on 127.0.0.1 (dashboard on, token
authentication on), `ray job submit --working-dir . -- python -m bluelm_v.launch ...`, wait for
success, read the job's summary.json, stop the head."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head node of its own (own temp dir, ports, token); stopped by killing exactly its
    processes, so other Ray clusters on the machine are left alone."""
    temp_dir = Path(f"/tmp/rayt_{secrets.token_hex(3)}")
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        victims = [p for p in psutil.process_iter(["cmdline"])
                   if any(str(temp_dir) in (a or "") for a in (p.info["cmdline"] or []))]
        for p in victims:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_launch_through_ray_jobs_api(ray_head, tmp_path):
    manifest = tmp_path / "sizes.csv"
    manifest.write_text("width,height\n394,390\n380,76\n380,393\n500,102\n768,1536\n")
    run_dir = tmp_path / "run"
    env = ray_head["env"]
    # Without the token the cluster refuses the client: authentication is really on.
    anon = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    anon["RAY_AUTH_MODE"] = "disabled"
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head["dashboard"]],
                             capture_output=True, text=True, env=anon, timeout=120, cwd=REPO)
    assert refused.returncode != 0
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
           "--", "python", "-m", "bluelm_v.launch", "+experiment=ablate_tiling", "ray=cluster",
           f"dataset.manifest={manifest}", f"hydra.run.dir={run_dir}"]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after `ray start` returns
        submit = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
        log = submit.stdout + submit.stderr
        if "No available agent" not in log or time.time() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0 and "succeeded" in log, log[-4000:]
    assert f"summary: {run_dir / 'summary.json'}" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["n_images"] == 5
