"""Ray as the README uses it, and the local cluster every job starts: a real head on 127.0.0.1
(dashboard on, token authentication on, usage statistics off), `ray job submit --working-dir . --
python -m bluelm_v.launch ...`, the job's summary.json; every Ray service of the head and of the
launcher's own local cluster listens on 127.0.0.1 only."""
from __future__ import annotations

import ipaddress
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

from bluelm_v.cluster import LOCAL_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(processes) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket these processes listen on and every
    UDP socket they have bound."""
    rows = []
    for p in processes:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                    rows.append((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return rows


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the Ray cluster whose temp dir is ``temp_dir``, and their children."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in (a or "") for a in (p.info["cmdline"] or [])):
            for q in [p, *p.children(recursive=True)]:
                found[q.pid] = q
    return list(found.values())


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node of its own (own temp dir, ports, token), started as the README says; stopped
    by killing exactly its processes, so other Ray clusters on the machine are left alone."""
    temp_dir = Path(f"/tmp/rayt_{secrets.token_hex(3)}")
    token = secrets.token_hex(16)
    env = dict(os.environ, **LOCAL_ENV, RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent = free_port(), free_port(), free_port(), free_port()
    # Ports of its own (the README's defaults would clash with other clusters on a shared machine).
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "temp_dir": temp_dir}
    finally:
        victims = ray_processes(temp_dir)
        for p in victims:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(ray_head, *args, tmp_path):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
           "--", "python", "-m", "bluelm_v.launch", *args]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after `ray start` returns
        out = subprocess.run(cmd, capture_output=True, text=True, env=ray_head["env"], timeout=600, cwd=REPO)
        log = out.stdout + out.stderr
        if "No available agent" not in log or time.time() > deadline:
            return out.returncode, log
        time.sleep(2)


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
    code, log = submit(ray_head, "+experiment=ablate_tiling", "ray=cluster", f"dataset.manifest={manifest}",
                       f"hydra.run.dir={run_dir}", tmp_path=tmp_path)
    assert code == 0 and "succeeded" in log, log[-4000:]
    assert f"summary: {run_dir / 'summary.json'}" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["n_images"] == 5


@pytest.mark.slow
def test_submitted_run_selects_a_component_without_yaml(ray_head, tmp_path):
    """encoder=siglip has no conf/encoder/siglip.yaml: its node comes from the registry, in the
    job the Ray job supervisor starts too."""
    run_dir = tmp_path / "run"
    code, log = submit(ray_head, "+experiment=generate", "encoder=siglip", "llm=tiny", "engine=hf", "image=null",
                       "prompt=Hi", "max_new_tokens=2", f"hydra.run.dir={run_dir}", tmp_path=tmp_path)
    assert code == 0 and "succeeded" in log, log[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["new_tokens"] == 2
    encoder = summary["config"]["encoder"]
    assert encoder["name"] == "siglip" and encoder["implementation"] == "transformers"   # siglip's own defaults


@pytest.mark.slow
def test_readme_head_listens_on_loopback_only(ray_head):
    rows = listening(ray_processes(ray_head["temp_dir"]))
    names = {name for name, _, _ in rows}
    assert {"gcs_server", "raylet"} <= names, rows
    assert all(loopback(ip) for _, ip, _ in rows), [r for r in rows if not loopback(r[1])]


LOCAL_CLUSTER = """
import json, os, time
import psutil
from omegaconf import OmegaConf
from bluelm_v import cluster
cfg = OmegaConf.load("conf/ray/local.yaml")
cfg.num_cpus = 1
info = cluster.connect(cfg)
import ray
from ray._common.usage import usage_lib

@ray.remote
def pid():
    return os.getpid()

ray.get(pid.remote())            # a worker is up
time.sleep(1)
me = psutil.Process()
procs = [me, *me.children(recursive=True)]
rows = []
for p in procs:
    try:
        rows += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr)]
    except psutil.Error:
        pass
print(json.dumps({"info": info, "node_ip": ray.util.get_node_ip_address(), "listen": rows, "usage_stats": usage_lib.usage_stats_enabled(),
                  "auth": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
"""


def test_launcher_local_cluster_is_loopback_only_without_usage_stats_and_with_token_auth():
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_ENV}     # as a user's shell has it
    out = subprocess.run([sys.executable, "-c", LOCAL_CLUSTER], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["info"]["address"] == "local" and report["node_ip"] == "127.0.0.1"
    names = {name for name, _, _ in report["listen"]}
    assert {"gcs_server", "raylet"} <= names, report["listen"]
    assert all(loopback(ip) for _, ip, _ in report["listen"]), report["listen"]
    assert report["usage_stats"] is False and report["auth"] == "token"
