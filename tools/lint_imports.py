"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

    python tools/lint_imports.py          (what `make test` runs first; exit 1 on a broken contract)

plugins/ and jobs/ are installed as bluelm_v.plugins and bluelm_v.jobs (package-dir mapping), but
import-linter reads packages from one folder tree. So the package is staged the way a wheel lays
it out (bluelm_v/ + bluelm_v/plugins/ + bluelm_v/jobs/, Python files only) in a temporary folder
and lint-imports runs over that copy.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"bluelm_v": "bluelm_v", "plugins": "bluelm_v/plugins", "jobs": "bluelm_v/jobs"}


def stage(into: Path) -> None:
    for source, target in LAYOUT.items():
        for path in (ROOT / source).rglob("*.py"):
            dest = into / target / path.relative_to(ROOT / source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def main() -> int:
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="bluelm_v_lint_") as tmp:
        stage(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        return subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
