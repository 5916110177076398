"""The benchmark job end to end on small grids: fan-out over Ray actors, results streamed to
results.jsonl, rerun skips finished cases, a killed actor loses no finished case, a hung case
is retried once then recorded failed, a device that cannot load fails its cases clearly."""
from __future__ import annotations

import json
import threading
import time

import pytest
from omegaconf import OmegaConf, open_dict

from bluelm_v import launch
from bluelm_v.errors import ConfigError
from bluelm_v.jobs.benchmark import actor_prefix

SIM = {"name": "simulated_npu", "profile": "dimensity9300"}
PROTOCOL = ["job.warmup=0", "job.trials=1", "job.plots=false"]
PAPER_SWEEPS = {"tiles_per_batch": [1, 2, 4, 6], "prefill_chunk": [32, 128, 512, 2048]}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def config(compose, devices, *overrides, vary=PAPER_SWEEPS):
    """The benchmark experiment with these devices and sweeps (Hydra would merge a `vary`
    override into the default sweeps; here they are replaced)."""
    cfg = compose(["+experiment=benchmark", *PROTOCOL, *overrides])
    cfg.job.devices = OmegaConf.create(devices)
    cfg.job.cases.vary = OmegaConf.create(vary)
    return cfg


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_inventory_small_grid_end_to_end(compose, ray_cluster, tmp_path):
    """Host (real runtime, tiny model) + 2 simulated Dimensity 9300: every case recorded with its
    figures, a Table-5-like report, plots, and the paper's optima on the simulated phones."""
    cfg = compose(["+experiment=benchmark", "job.warmup=0", "job.trials=2", "job.extra_trials=0"])
    cfg.job.cases.vary = OmegaConf.create(PAPER_SWEEPS)
    with open_dict(cfg):
        cfg.job.devices[0].cases = {"base": {"prompt_tokens": 1900, "decode_tokens": 4}}
    summary = launch.run(cfg, tmp_path)
    assert summary["status"] == "ok" and summary["cases"] == 21 and summary["ok"] == 21 and summary["failed"] == 0
    recs = records(tmp_path)
    assert len(recs) == 21 and {r["device"] for r in recs} == {"host", "dimensity9300-a", "dimensity9300-b"}
    host = [r for r in recs if r["device"] == "host"]
    for r in host:                                  # real, measured, and checked against torch
        m = r["metrics"]
        assert r["kind"] == "real" and m["simulated"] is False and r["trials"] == 2
        assert m["encode_s"] > 0 and m["prefill_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["load_s"] > 0
        assert m["check_ok"] and m["peak_memory_mb"] > 0 and m["prompt_tokens"] <= 1900
    for name in ("dimensity9300-a", "dimensity9300-b"):   # REGRESSION GUARD of the predicted optima
        assert summary["findings"][name] == {"best_tiles_per_batch": 6, "best_prefill_chunk": 2048}
        assert summary["devices"][name]["base"]["encode_s"] == pytest.approx(2.06, rel=0.05)   # predicted
    report = (tmp_path / "report.md").read_text()
    assert "| host | local_torch |" in report and "| dimensity9300-a | simulated_npu | 2.5" in report
    for png in ("encode_vs_tiles_per_batch.png", "prefill_vs_chunk.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] == 21


def test_top_level_engine_runs_the_host_unless_the_device_names_its_own(compose, ray_cluster, tmp_path):
    devices = [{"name": "host-top", "backend": {"name": "local_torch"}},
               {"name": "host-own", "backend": {"name": "local_torch", "engine": "fast"}}]
    cfg = config(compose, devices, "engine=hf", vary={})
    with open_dict(cfg):
        cfg.job.cases.base.decode_tokens = 2
    summary = launch.run(cfg, tmp_path)
    assert summary["status"] == "ok"
    engines = {r["device"]: r["metrics"]["engine"] for r in records(tmp_path)}
    assert engines == {"host-top": "hf", "host-own": "fast"}


def test_rerun_in_the_same_directory_skips_finished_cases(compose, ray_cluster, tmp_path):
    devices = [{"name": "sim-b", "backend": "simulated_npu", "profile": "dimensity9300"}]   # flat form
    first = launch.run(config(compose, devices), tmp_path)
    assert first["ran"] == 7 and first["ok"] == 7
    lines = (tmp_path / "results.jsonl").read_text()
    second = launch.run(config(compose, devices), tmp_path)
    assert second["ran"] == 0 and second["skipped_finished"] == 7 and second["ok"] == 7
    assert (tmp_path / "results.jsonl").read_text() == lines
    # a torn last line (the job died mid-write) is ignored and that case runs again
    kept = lines.splitlines()[:-1]
    (tmp_path / "results.jsonl").write_text("\n".join(kept) + "\n" + '{"device": "sim-b", "case_')
    third = launch.run(config(compose, devices), tmp_path)
    assert third["ran"] == 1 and third["ok"] == 7
    assert (tmp_path / "results.jsonl").read_text().startswith("\n".join(kept) + "\n")


def test_killed_actor_loses_no_finished_case(compose, ray_cluster, tmp_path):
    """Kill a device's actor mid-run: finished lines stay as written, the case it was running
    (or the next one sent to it) is retried on a fresh actor, and everything finishes ok."""
    devices = [{"name": "phone", "backend": {**SIM, "realtime_scale": 0.08}}]
    cfg = config(compose, devices)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(launch.run(cfg, tmp_path)))
    thread.start()
    path = tmp_path / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    before = path.read_text()
    assert len(before.splitlines()) >= 2, "the job never got going"
    victim = ray_cluster.get_actor(f"{actor_prefix(tmp_path)}-phone-1")
    ray_cluster.kill(victim, no_restart=True)
    thread.join(timeout=240)
    assert not thread.is_alive()
    after = path.read_text()
    assert after.startswith(before)                               # nothing finished was lost
    recs = records(tmp_path)
    assert out["ok"] == 7 and out["failed"] == 0 and out["actor_restarts"] == 1 and out["retried"] == 1
    assert len(recs) == 7 and len({r["case_id"] for r in recs}) == 7
    retried = [r for r in recs if r["attempts"] == 2]
    assert len(retried) == 1 and retried[0]["pid"] != recs[0]["pid"]   # it ran on the new actor


def test_hung_case_is_retried_once_then_recorded_failed(compose, ray_cluster, tmp_path):
    """A simulated phone replaying its latency in real time: the 2:4 image (~7.1 s) exceeds the
    4 s timeout twice and is recorded failed; the small images before and after it (~1.8 and
    ~2.3 s) finish, the last one on the replacement actor."""
    devices = [{"name": "slow", "backend": {**SIM, "realtime_scale": 1.0}}]
    cfg = config(compose, devices, "job.case_timeout_s=4", "job.cases.base.prompt_tokens=64",
                 "job.cases.base.decode_tokens=0", "job.cases.base.image=[384,384]",
                 vary={"image": [[384, 384], [768, 1536], [512, 384]]})
    summary = launch.run(cfg, tmp_path)
    recs = {tuple(r["case"]["image"]): r for r in records(tmp_path)}
    hung = recs[(768, 1536)]
    assert hung["status"] == "failed" and hung["attempts"] == 2 and "timed out after 4 s" in hung["error"]
    assert recs[(384, 384)]["status"] == "ok" and recs[(512, 384)]["status"] == "ok"
    assert recs[(512, 384)]["pid"] != recs[(384, 384)]["pid"]
    assert summary["failed"] == 1 and summary["retried"] == 1 and summary["actor_restarts"] == 2
    assert "## Failed cases" in (tmp_path / "report.md").read_text()


def test_device_that_cannot_load_fails_its_cases_with_the_reason(compose, ray_cluster, tmp_path):
    devices = [{"name": "phone", "backend": {"name": "adb", "adb_path": str(tmp_path / "no-adb"), "runner": "r"}},
               {"name": "sim", "backend": SIM}]
    summary = launch.run(config(compose, devices, vary={"tiles_per_batch": [2, 4]}), tmp_path)
    recs = records(tmp_path)
    phone = [r for r in recs if r["device"] == "phone"]
    assert len(phone) == 2 and all(r["status"] == "failed" for r in phone)
    assert all(r["error"].startswith("load: AdbError: adb not found") for r in phone)
    assert summary["ok"] == 2 and summary["failed"] == 2
    assert summary["status"] == "partial" and summary["reason"].startswith("2 of 4 cases failed, 2 ok: load: AdbError")


def test_every_case_failed_is_a_failed_job_with_the_reason(compose, ray_cluster, tmp_path):
    devices = [{"name": "phone", "backend": {"name": "adb", "adb_path": str(tmp_path / "no-adb"), "runner": "r"}}]
    summary = launch.run(config(compose, devices, vary={"tiles_per_batch": [2, 4]}), tmp_path)
    assert summary["status"] == "failed" and summary["ok"] == 0 and summary["failed"] == 2
    assert summary["reason"].startswith("every case failed (2 of 2): load: AdbError: adb not found")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_ssh_board_lost_mid_case_is_retried_failed_then_resumed(compose, ray_cluster, tmp_path):
    """The job fans out to an SSH server on 127.0.0.1 through the real transport: the export and
    the runner are pushed and run there. The server is stopped while the second case runs: that
    case is retried once, then recorded failed with the reason; the finished case stays; with the
    board back, the same run directory resumes and runs only what failed."""
    from ssh_board import SshBoard

    board = SshBoard(tmp_path / "b").start()
    runs = []

    def on_exec(command):
        if "bluelm_v_runner.py --export" in command:
            runs.append(command)
            if len(runs) == 2:                       # the second case is running: the board goes away
                threading.Timer(0.3, board.stop).start()

    board.on_exec = on_exec
    devices = [{"name": "board", "backend": board.backend_node(threads=1, export_dir=str(tmp_path / "export"))}]
    vary = {"seed": [1, 2]}                          # other images, the same graphs: exported once
    base = ["job.cases.base.image=[768,768]", "job.cases.base.prompt_tokens=900", "job.cases.base.decode_tokens=3",
            "job.cases.base.prefill_chunk=64", "job.cases.base.quantizer=null", "job.case_timeout_s=120"]
    try:
        first = launch.run(config(compose, devices, *base, vary=vary), tmp_path / "run")
        recs = records(tmp_path / "run")
        assert [r["status"] for r in recs] == ["ok", "failed", "failed"]
        ok, lost = recs[0], recs[1]
        assert ok["metrics"]["export_version"] == 1 and ok["metrics"]["crops"] == 5 and ok["metrics"]["tokens"]
        assert ok["metrics"]["ttft_s"] > 0 and ok["metrics"]["peak_memory_mb"] > 0 and ok["kind"] == "real"
        assert lost["attempts"] == 2 and lost["retryable"] and "ssh bench@127.0.0.1" in lost["error"]
        assert first["status"] == "partial" and first["retried"] >= 1 and "2 of 3 cases failed" in first["reason"]
        before = (tmp_path / "run" / "results.jsonl").read_text()
        board.on_exec = None
        board.start()
        again = launch.run(config(compose, devices, *base, vary=vary), tmp_path / "run")
        after = (tmp_path / "run" / "results.jsonl").read_text()
        assert after.startswith(before) and again["ran"] == 2 and again["skipped_finished"] == 1
        assert again["status"] == "ok" and again["ok"] == 3
    finally:
        board.close()


def test_devices_that_do_not_fit_together_take_turns(compose, ray_cluster, tmp_path):
    """On a 2-CPU cluster two 2-CPU devices run one after the other (the first one's actor is
    freed when it finishes); a device needing more CPUs than exist fails with the reason."""
    devices = [{"name": "first", "backend": SIM, "num_cpus": 2}, {"name": "second", "backend": SIM, "num_cpus": 2},
               {"name": "huge", "backend": SIM, "num_cpus": 64}]
    summary = launch.run(config(compose, devices, vary={"tiles_per_batch": [2, 4]}), tmp_path)
    recs = records(tmp_path)
    order = [r["device"] for r in recs if r["device"] != "huge"]
    assert order == ["first", "first", "second", "second"] and summary["ok"] == 4
    huge = [r for r in recs if r["device"] == "huge"]
    assert len(huge) == 2 and all("needs 64 CPUs; the Ray cluster has 2" in r["error"] for r in huge)


def test_devices_from_the_hook_join_the_inventory(compose, ray_cluster, tmp_path):
    from bluelm_v import hookimpl
    from bluelm_v.job import JobContext
    from bluelm_v.jobs import benchmark
    from bluelm_v.plugin_manager import load_plugins

    class LabInventory:
        @hookimpl
        def bluelm_v_devices(self, config):
            return [{"name": "lab-phone", "backend": SIM}]

    pm, registry, _ = load_plugins(extra=[LabInventory()])
    cfg = config(compose, [{"name": "sim", "backend": SIM}], vary={})
    summary = benchmark.run(JobContext(cfg=cfg, run_dir=tmp_path, registry=registry, pm=pm, job="benchmark"))
    assert set(summary["devices"]) == {"sim", "lab-phone"} and summary["ok"] == 2


@pytest.mark.parametrize("devices, overrides, message", [
    ([{"name": "a", "backend": SIM}, {"name": "a", "backend": SIM}], [], "device name 'a' is used twice"),
    ([{"name": "a", "backend": {"name": "simulated_npux"}}], [], "no backend named 'simulated_npux'"),
    ([{"name": "a", "backend": {**SIM, "profil": "x"}}], [], r"profil: unknown parameter"),
    ([{"name": "a b", "backend": SIM}], [], "may hold only letters"),
    ([{"name": "a", "backend": SIM}], ["+job.cases.base.tiles=4"], r"job.cases.base.tiles: unknown case field"),
    ([{"name": "a", "backend": SIM, "cases": {"base": {"tiles": 4}}}], [], r"job.devices\[a\].cases.base.tiles: unknown"),
    ([{"name": "a", "backend": SIM}], ["job.cases.base.prefill_chunk=0"], "expected a positive integer"),
    ([{"name": "a", "backend": SIM}], ["job.cases.base.quantizer={name: w5}"], "no quantizer named 'w5'"),
    ([{"name": "a", "backend": SIM}], ["job.cases.base.quantizer.name=w4", "+job.cases.base.quantizer.group_size=48"], "48 is not one of"),
])
def test_bad_inventory_or_grid_fails_before_any_work(compose, devices, overrides, message):
    from bluelm_v.plugin_manager import get

    cfg = config(compose, devices, *overrides)
    with pytest.raises(ConfigError, match=message):
        launch.validate(cfg, get()[1])
