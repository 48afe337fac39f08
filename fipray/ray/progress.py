"""Progress of a `fipray paths` run: each path pushes its record rows to one collector actor the driver polls.

    collector = start_collector()                 # pinned to the driver's node
    rep = Reporter(collector, k, every_s)         # inside path k: the core loop's callback
    ray.get(collector.snapshot.remote())          # every row once, keyed by row_key

Rows re-sent by a restarted path are dropped by key (path, phase, phase_step).
"""

from __future__ import annotations

import time
from typing import Any

import ray


def row_key(k: int, row: dict) -> tuple:
    """A record row's key: (path, phase, phase_step)."""
    return (k, row["phase"], row["phase_step"])


@ray.remote(num_cpus=0)
class Collector:
    """Receives the record rows and start events of every path; the driver polls it."""

    def __init__(self) -> None:
        self.rows: dict[tuple, dict] = {}
        self.duplicates = 0
        self.steps: dict[int, int] = {}
        self.starts: dict[int, list[int]] = {}

    def start(self, k: int, pid: int) -> int:
        self.starts.setdefault(k, []).append(pid)
        return len(self.starts[k])

    def push(self, k: int, rows: list[dict], step: int) -> None:
        for r in rows:
            key = row_key(k, r)
            if key in self.rows:
                self.duplicates += 1
            self.rows[key] = r
        self.steps[k] = max(self.steps.get(k, 0), step)

    def progress(self) -> dict[int, int]:
        return dict(self.steps)

    def snapshot(self) -> dict:
        return {"rows": [{"path": key[0], **r} for key, r in sorted(self.rows.items(), key=lambda kv: (
            kv[0][0], kv[1]["step"]))], "duplicates": self.duplicates, "starts": self.starts}


class Reporter:
    """The core loop's callback inside a path: buffers record rows, pushes them every few seconds."""

    def __init__(self, collector: Any, k: int, every_s: float, enabled: bool = True):
        self.collector, self.k, self.every_s, self.enabled = collector, k, every_s, enabled
        self.rows: list[dict] = []
        self.step = 0
        self.last = time.monotonic()

    def __call__(self, event: str, payload: dict) -> None:
        if event == "record":
            self.rows.append(dict(payload))
            self.step = max(self.step, int(payload["step"]))
        elif event == "checkpoint":
            self.step = max(self.step, int(payload["global_step"]))
        if event == "checkpoint" or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.enabled and (self.rows or self.step):
            self.collector.push.remote(self.k, self.rows, self.step)
        self.rows, self.last = [], time.monotonic()


def start_collector() -> Any:
    """The row collector, pinned to the driver's node: a node lost mid-run never takes the rows with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return Collector.options(  # type: ignore[attr-defined]
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
