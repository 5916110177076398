"""results.jsonl: one line per finished (device, case), appended and fsync'ed as it finishes.

A rerun in the same run directory reads it back and skips what is there; a torn last line (the
job was killed mid-write) is ignored and rewritten by the rerun.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from bluelm_v.job import to_jsonable


class ResultStore:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict]:
        """Every complete record (a line that does not parse is skipped)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "device" in rec and "case_id" in rec:
                records.append(rec)
        return records

    def finished(self, statuses=("ok", "failed"), keep_retryable: bool = True) -> set[tuple[str, str]]:
        """(device, case) whose last record has one of ``statuses``; with ``keep_retryable=False``
        a failure marked retryable (the device was lost) does not count as finished."""
        last = {(r["device"], r["case_id"]): r for r in self.read()}
        return {key for key, r in last.items() if r.get("status") in statuses
                and (keep_retryable or r.get("status") == "ok" or not r.get("retryable"))}

    def append(self, record: dict) -> None:
        line = json.dumps(to_jsonable(record), sort_keys=False)
        self._repair_tail()
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _repair_tail(self) -> None:
        """A file not ending in a newline had its last write cut: end that line first."""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "a") as g:
                        g.write("\n")
