"""Fan benchmark cases out to devices: one Ray actor per device, one case per device at a time.

    fan = Fanout(devices, config, protocol, store, case_timeout_s=300, load_timeout_s=600)
    counts = fan.run({device_name: [case, ...]}, on_record=callback)

Every finished case goes to ``store`` (results.jsonl) the moment it finishes. An actor that dies
or hangs past its timeout is killed and replaced (the replacement loads again); the case it was
running is retried ``retries`` times on the same device, then recorded as failed with the error.
A case whose backend raises is recorded as failed at once (a deterministic error), unless the
error is ``retryable`` (a lost or unanswering device: plugins/backends/transport.py): then the
case is retried ``retries`` times on the same actor (its backend reconnects), and if it still
fails it is recorded failed with ``retryable: true``, which a resumed run repeats. A device
whose backend cannot load gets every case recorded as failed with the load error. Actors take
their device's ``num_cpus``; devices that do not fit in the cluster together wait and start as
others finish (a finished device's actor is killed at once).
"""
from __future__ import annotations

import datetime as _dt
import time
from collections import deque
from dataclasses import dataclass, field

from bluelm_v.jobs.benchmark.worker import DeviceWorker


def actor_name(prefix: str, device: str, generation: int) -> str:
    return f"{prefix}-{device}-{generation}"


def _retryable(exc: BaseException) -> bool:
    return bool(getattr(getattr(exc, "cause", None), "retryable", False))


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


@dataclass
class _Device:
    spec: dict
    queue: deque = field(default_factory=deque)   # (case, attempt)
    actor: object = None
    generation: int = 0
    load_info: dict | None = None
    load_attempts: int = 0
    restarts: int = 0


class Fanout:
    def __init__(self, devices: list[dict], config: dict, protocol: dict, store, *, case_timeout_s: float = 300,
                 load_timeout_s: float = 600, retries: int = 1, poll_s: float = 0.2, prefix: str = "bench"):
        self.devices = {d["name"]: _Device(d) for d in devices}
        self.config, self.protocol, self.store = config, protocol, store
        self.case_timeout_s, self.load_timeout_s = float(case_timeout_s), float(load_timeout_s)
        self.retries, self.poll_s, self.prefix = int(retries), float(poll_s), prefix
        self.inflight: dict = {}       # ref -> (device name, "load" | "case", case, attempt, started)
        self.counts = {"ok": 0, "failed": 0, "retried": 0, "actor_restarts": 0}
        self.on_record = None
        self.measuring = False         # True once every device's first load has finished (see run)
        self.waiting: deque = deque()  # devices waiting for CPUs (started as others finish)
        self.total_cpus = 0.0

    # -- actors ----------------------------------------------------------------------------
    def _start(self, dev: _Device) -> None:
        import ray

        dev.generation += 1
        dev.load_attempts += 1
        remote = ray.remote(DeviceWorker).options(
            name=actor_name(self.prefix, dev.spec["name"], dev.generation), num_cpus=dev.spec["num_cpus"],
            max_restarts=0, max_concurrency=1)
        dev.actor = remote.remote(dev.spec, self.config)
        self.inflight[dev.actor.load.remote()] = (dev.spec["name"], "load", None, 0, time.monotonic())

    def _kill(self, dev: _Device) -> None:
        import ray

        if dev.actor is not None:
            try:
                ray.kill(dev.actor, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        dev.actor = None

    def _submit_next(self, dev: _Device) -> None:
        if not self.measuring:          # the first loads run in parallel; cases start after them all
            if any(kind == "load" for _, kind, *_ in self.inflight.values()):
                return
            self.measuring = True
            for other in self.devices.values():
                if other is not dev:
                    self._submit_next(other)
        if dev.queue and dev.actor is not None and dev.load_info is not None:
            case, attempt = dev.queue.popleft()
            ref = dev.actor.measure.remote(case, self.protocol)
            self.inflight[ref] = (dev.spec["name"], "case", case, attempt, time.monotonic())
        elif not dev.queue and not any(n == dev.spec["name"] for n, *_ in self.inflight.values()):
            self._kill(dev)             # done: free its CPUs for a device waiting for them
            self._start_waiting()

    def _start_waiting(self) -> None:
        """Start waiting devices, in inventory order, while their CPUs fit in what is free."""
        def free() -> float:
            return self.total_cpus - sum(d.spec["num_cpus"] for d in self.devices.values() if d.actor is not None)

        while self.waiting and self.waiting[0].spec["num_cpus"] <= free():
            self._start(self.waiting.popleft())

    # -- records ---------------------------------------------------------------------------
    def _record(self, dev: _Device, case: dict, status: str, attempt: int, result: dict | None = None,
                error: str | None = None, retryable: bool = False) -> None:
        rec = {"device": dev.spec["name"], "case_id": case["id"], "status": status,
               "backend": dev.spec["backend"]["name"], "kind": (dev.load_info or {}).get("kind"),
               "attempts": attempt, "error": error, "retryable": retryable, "case": case,
               "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if result is not None:
            metrics = dict(result.get("metrics") or {})
            metrics.setdefault("load_s", (dev.load_info or {}).get("load_wall_s"))
            rec.update({k: v for k, v in result.items() if k != "metrics"}, metrics=metrics)
        self.store.append(rec)
        self.counts[status] += 1
        if self.on_record:
            self.on_record(rec)

    def _fail_queue(self, dev: _Device, error: str, retryable: bool = False) -> None:
        while dev.queue:
            case, attempt = dev.queue.popleft()
            self._record(dev, case, "failed", max(attempt, 1), error=error, retryable=retryable)

    def _lost(self, dev: _Device, kind: str, case: dict | None, attempt: int, error: str) -> None:
        """The actor died or hung: retry the case (or the load) on a fresh actor, or give up."""
        self._kill(dev)
        dev.load_info = None
        if kind == "case":
            if attempt <= self.retries:
                dev.queue.appendleft((case, attempt + 1))
                self.counts["retried"] += 1
            else:
                self._record(dev, case, "failed", attempt, error=error)
        elif dev.load_attempts > self.retries:
            self._fail_queue(dev, f"load: {error}")
            return
        if dev.queue:
            dev.restarts += 1
            self.counts["actor_restarts"] += 1
            self._start(dev)

    # -- the loop --------------------------------------------------------------------------
    def run(self, work: dict[str, list[dict]], on_record=None) -> dict:
        import ray
        from ray.exceptions import RayError, RayTaskError

        self.on_record = on_record
        self.total_cpus = float(ray.cluster_resources().get("CPU", 0))
        for name, cases in work.items():
            dev = self.devices[name]
            dev.queue.extend((c, 1) for c in cases)
            if dev.queue and dev.spec["num_cpus"] > self.total_cpus:
                self._fail_queue(dev, f"the device needs {dev.spec['num_cpus']:g} CPUs; the Ray cluster has {self.total_cpus:g}")
            elif dev.queue:
                self.waiting.append(dev)
        self._start_waiting()
        # Cases start once every first load is done (loading perturbs timings), unless some
        # devices wait for CPUs that others free only when they finish.
        self.measuring = bool(self.waiting)
        try:
            while self.inflight or self.waiting:
                if not self.inflight:                    # cannot happen while the CPU sums hold
                    for dev in list(self.waiting):
                        self._fail_queue(dev, "never got the CPUs it needs")
                    self.waiting.clear()
                    break
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    name, kind, case, attempt, _ = self.inflight.pop(ref)
                    dev = self.devices[name]
                    try:
                        result = ray.get(ref)
                    except RayTaskError as exc:          # the backend raised
                        retry = _retryable(exc)
                        if kind == "load":
                            self._kill(dev)
                            self._fail_queue(dev, f"load: {_error_text(exc)}", retry)
                        elif retry and attempt <= self.retries:   # the device was lost: once more
                            dev.queue.appendleft((case, attempt + 1))
                            self.counts["retried"] += 1
                        else:
                            self._record(dev, case, "failed", attempt, error=_error_text(exc), retryable=retry)
                        self._submit_next(dev)
                        continue
                    except RayError as exc:              # the actor died (killed, crashed, out of memory)
                        self._lost(dev, kind, case, attempt, f"actor died: {_error_text(exc)}")
                        self._submit_next(dev)
                        continue
                    if kind == "load":
                        dev.load_info, dev.load_attempts = result, 0
                    else:
                        self._record(dev, case, "ok", attempt, result)
                    self._submit_next(dev)
                self._check_timeouts()
        finally:
            for dev in self.devices.values():
                self._kill(dev)
        return dict(self.counts)

    def device_info(self) -> dict:
        """What each device's (last) load reported, and how often its actor was replaced."""
        return {name: {"load": d.load_info, "actor_restarts": d.restarts} for name, d in self.devices.items()}

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for ref, (name, kind, case, attempt, started) in list(self.inflight.items()):
            limit = self.load_timeout_s if kind == "load" else self.case_timeout_s
            if now - started > limit:
                del self.inflight[ref]
                what = "loading" if kind == "load" else f"case {case['id']}"
                self._lost(self.devices[name], kind, case, attempt, f"timed out after {limit:g} s ({what})")
                self._submit_next(self.devices[name])
