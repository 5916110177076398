"""Per-step metrics from the rank-0 worker to the driver, which owns the job's loggers.

Workers call ``relay.push.remote(metrics)`` (fire and forget); a thread in the driver drains
the actor every ``interval`` seconds and hands each record to a callback (ctx.log_metrics +
metrics.jsonl). Works the same on a laptop and on a cluster (the actor takes no CPU).
"""
from __future__ import annotations

import threading


class _Relay:
    def __init__(self):
        self.items: list[dict] = []

    def push(self, item: dict) -> None:
        self.items.append(item)

    def drain(self) -> list[dict]:
        out, self.items = self.items, []
        return out


class MetricsPump:
    """Start the relay actor and a draining thread; ``close()`` drains what is left."""

    def __init__(self, callback, interval: float = 0.5):
        import ray

        self.actor = ray.remote(num_cpus=0)(_Relay).remote()
        self.callback, self.interval = callback, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-pump", daemon=True)
        self._thread.start()

    def _drain_once(self) -> None:
        import ray

        for item in ray.get(self.actor.drain.remote()):
            self.callback(item)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain_once()

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        self._drain_once()
        ray.kill(self.actor)
