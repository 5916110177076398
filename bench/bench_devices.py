"""The benchmark job over four devices in one run: this host (local_torch), an SSH "board" on
127.0.0.1 running the device runner through the real ssh transport, and two simulated Dimensity
9300 phones; the same base case on the host and the board (same model, one thread each).

    .venv/bin/python bench/bench_devices.py --out /tmp/bench_devices          # ~5 min on 2 cores
    .venv/bin/python bench/bench_devices.py --out /tmp/bench_devices --smoke  # one case per device

The board is an asyncssh server in this process (tests/ssh_board.py: key authentication, its own
host key in a known_hosts file, commands run with /bin/sh); its "device Python" is this venv's.
Prints the report's per-device tables; everything is in OUT (report.md, results.jsonl,
benchmark_results.json, devices_compare.png).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run directory (again: resumes)")
    ap.add_argument("--smoke", action="store_true", help="one small case per device, one trial")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from ssh_board import SshBoard

    from bluelm_v import launch

    board = SshBoard(Path(tempfile.mkdtemp(prefix="bluelm_v_board_"))).start()
    devices = [{"name": "host", "backend": {"name": "local_torch", "threads": 1}, "num_cpus": 1},
               {"name": "ssh-board", "backend": board.backend_node(threads=1), "num_cpus": 1},
               {"name": "dimensity9300-a", "backend": {"name": "simulated_npu", "profile": "dimensity9300"}},
               {"name": "dimensity9300-b", "backend": {"name": "simulated_npu", "profile": "dimensity9300"}}]
    overrides = ["+experiment=benchmark", "ray.num_cpus=2", "job.cases.base.quantizer=null", "job.warmup=1",
                 "job.trials=3", "job.extra_trials=0"]
    vary = {"tiles_per_batch": [1, 2, 4, 6], "prefill_chunk": [32, 128, 512]}
    if args.smoke:
        overrides += ["job.trials=1", "job.warmup=0", "job.cases.base.prompt_tokens=600",
                      "job.cases.base.image=[384,384]", "job.cases.base.decode_tokens=4"]
        vary = {}
    with initialize_config_module(config_module="bluelm_v.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.job.devices = OmegaConf.create(devices)
    cfg.job.cases.vary = OmegaConf.create(vary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = launch.run(cfg, out)
    finally:
        board.close()
    report = (out / "report.md").read_text()
    start = report.index("## Per device")
    print(report[start:report.index("## Sweeps")])
    print({k: summary[k] for k in ("status", "cases", "ok", "failed", "findings")})
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
