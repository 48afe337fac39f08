"""Run `fipray paths` on a simulated multi-node Ray cluster (`ray.cluster_utils.Cluster`) in this process.

    python tests/ray/_cluster_run.py SPEC_JSON   ->  prints "RESULT <json>" on its last line

SPEC: {"config": yaml file, "overrides": [...], "out": folder, "temp_dir": Ray's folder (short),
       "head": {node args}, "workers": [{node args}, ...], "remove_after_checkpoint": bool}

A separate process, because a test session's own Ray (tests/ray/conftest.py) cannot share a process
with a second cluster. With `remove_after_checkpoint`, a watcher removes (kills, not gracefully) the
first worker node found running a path that has a checkpoint in storage but no result yet.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from fipray.job import load_job
    from fipray.ray.layout import path_rel, run_storage
    from fipray.ray.paths import run_paths

    spec = json.loads(sys.argv[1])
    fast_failure_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                              "health_check_initial_delay_ms": 0}
    cluster = Cluster(initialize_head=True, head_node_args={
        "temp_dir": spec["temp_dir"], "include_dashboard": False, "_system_config": fast_failure_detection,
        **spec["head"]})
    workers = [cluster.add_node(**w) for w in spec["workers"]]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, _node_ip_address=spec["head"].get("node_ip_address"))
    job = load_job(spec["config"], spec.get("overrides", []))
    from pathlib import Path

    storage = run_storage(job, Path(spec["out"]).resolve())
    removed: dict = {}

    def watch() -> None:
        by_id = {w.node_id: w for w in workers}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not removed:
            for k in range(job.ray.num_paths):
                rel = path_rel(k)
                try:
                    names = storage.files(rel)
                    if "checkpoint.pt" not in names or "worker.json" not in names or "result.json" in names:
                        continue
                    node = storage.read_json(f"{rel}/worker.json")["node"]
                except Exception:  # noqa: BLE001 - a file half-way through being written: look again
                    continue
                if node in by_id:
                    cluster.remove_node(by_id[node], allow_graceful=False)
                    removed.update(path=k, node=node, at=time.time())
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    if spec.get("remove_after_checkpoint"):
        watcher.start()
    t0 = time.perf_counter()
    summary = run_paths(job, spec["out"], progress=False, address=cluster.address)
    seconds = time.perf_counter() - t0
    nodes = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers],
             "driver": ray.get_runtime_context().get_node_id()}
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps({"summary": summary, "removed": removed, "nodes": nodes, "seconds": seconds}))


if __name__ == "__main__":
    main()
