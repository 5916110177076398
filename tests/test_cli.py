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


CLASHING_TILER = '''"""A tiler registered under a name another distribution also registers."""
from bluelm_v import hookimpl


class OneTile:
    """{dist}: always one tile"""

    def __init__(self, tile_size: int = 384):
        self.tile_size = tile_size

    def select(self, width, height):
        return 1, 1

    def select_many(self, widths, heights):
        import numpy as np
        return np.ones(len(widths), np.int64), np.ones(len(heights), np.int64)

    def num_crops(self, m, n):
        return m * n

    def transform(self, image):
        raise NotImplementedError


@hookimpl
def bluelm_v_register(registry):
    registry.tiler.register("square", OneTile)
'''


def installed_without_pip(root, dist: str, module: str, source: str) -> None:
    """A distribution as an installer leaves it: the module and a .dist-info with its entry point."""
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[bluelm_v]\n{module} = {module}\n")


def test_plugins_lists_both_providers_of_a_clashing_name(tmp_path):
    for dist, module in (("clash-one", "clash_one"), ("clash-two", "clash_two")):
        installed_without_pip(tmp_path, dist, module, CLASHING_TILER.replace("{dist}", dist))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    out = run_cli("plugins", "--json", env=env)
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["name"] == "square"]
    assert sorted(r["provider"] for r in rows) == ["clash-one", "clash-two"]
    assert all(len(r["clash"]) == 1 for r in rows) and any(r["name"] == "relaxed" for r in json.loads(out.stdout))
    table = run_cli("plugins", "--family", "tiler", env=env)
    assert table.returncode == 0
    assert [line.split()[1] for line in table.stdout.splitlines() if "CLASH" in line] == ["clash-one", "clash-two"]
    warning = [line for line in table.stderr.splitlines() if "square" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: tiler 'square' is registered by clash-")
    assert "clash-one" in warning[0] and "clash-two" in warning[0]
    # using the name still fails with one line naming both
    use = run_cli("describe", "tiler", "square", env=env)
    assert use.returncode == 2 and len(use.stderr.strip().splitlines()) == 1
    assert "'square' is registered 2 times" in use.stderr and "clash-one" in use.stderr and "clash-two" in use.stderr
    job = subprocess.run([sys.executable, "-m", "bluelm_v.launch", "+experiment=ablate_tiling", "tiler.name=square",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
    assert job.returncode == 2 and "Traceback" not in job.stderr
    assert "tiler: tiler 'square' is registered 2 times" in job.stderr
