"""Start or join Ray the same way in every fipray entry point.

Pitfalls behind the defaults (shared/RAY_NOTES.md): a plain ``ray.init()`` may attach to a stale
``ray_current_cluster`` left by a killed ``ray start`` and hang for minutes, so embedded runs ask for
``address="local"`` explicitly; driver log forwarding only adds noise (PreemptionWatcher errors,
ServeController kill messages); usage statistics must stay off on offline machines and in CI.
"""

from __future__ import annotations

import os
from typing import Any


def init_local(
    num_cpus: int | None = None,
    address: str | None = None,
    temp_dir: str | None = None,
    *,
    include_dashboard: bool = False,
    **kwargs: Any,
):
    """Start a private local Ray instance, or join a cluster when one is named.

    Args:
        num_cpus: CPUs of the local instance (None: all); ignored when joining a cluster.
        address: A cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6390"``). None falls back
            to the ``RAY_ADDRESS`` environment variable, and without it a fresh local instance starts.
        temp_dir: Ray's session folder for a local instance (a private one avoids stale cluster files).
        include_dashboard: Start the dashboard with a local instance. Tune's ASHA needs it (its
            placement-group cleaner uses the State API); Serve and plain actors do not.
        **kwargs: Passed on to ``ray.init`` (e.g. ``object_store_memory``, ``runtime_env``).

    Returns:
        The ``ray.init`` context. Calling again while Ray is up returns None and changes nothing.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs.setdefault("log_to_driver", False)
    if address and address != "local":
        return ray.init(address=address, **kwargs)
    if temp_dir is not None:
        kwargs["_temp_dir"] = str(temp_dir)
    return ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, **kwargs)
