"""`bluelm-v plugins` / `bluelm-v jobs` as a user runs them (a real subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bluelm_v import FAMILIES

CLI = [sys.executable, "-m", "bluelm_v.cli"]


def run_cli(*args, env=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env or dict(os.environ), timeout=120)


def test_plugins_json_lists_every_family_with_a_builtin():
    out = run_cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    for row in rows:
        assert {"family", "name", "provider", "description"} <= set(row)
    builtin = {r["family"] for r in rows if r["provider"] == "bluelm-v"}
    assert builtin == set(FAMILIES)
    assert "failed to import" not in out.stderr


def test_plugins_table_filters_by_family_and_pattern():
    out = run_cli("plugins", "--family", "tiler", "r*")
    assert out.returncode == 0, out.stderr
    assert "relaxed" in out.stdout and "llava_next" not in out.stdout and "encoder" not in out.stdout


def test_describe_unknown_name_is_one_line_error():
    out = run_cli("describe", "tiler", "relaxd")
    assert out.returncode == 2
    assert "no tiler named 'relaxd'" in out.stderr and "'relaxed'" in out.stderr
    assert "Traceback" not in out.stderr


def test_jobs_lists_every_experiment_with_purpose():
    from importlib import resources

    out = run_cli("jobs", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["experiment"]: r for r in json.loads(out.stdout)}
    on_disk = {p.name[:-5] for p in (resources.files("bluelm_v.conf") / "experiment").iterdir()
               if p.name.endswith(".yaml")}
    assert set(rows) == on_disk and "ablate_tiling" in rows
    for r in rows.values():
        assert r["description"], f"experiment {r['experiment']} has no description"
        assert r["job"] != "?"
