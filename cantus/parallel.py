"""Where work runs, kept apart from what it does.

``map_unordered(fn, items, ...)`` applies a plain function to every item,
in-process (``executor="local"``) or as Ray tasks (``executor="ray"``), with
at most ``max_in_flight`` items outstanding so memory stays bounded however
many items there are. Results come back as ``(index, result)`` pairs in
completion order; callers that need an order sort by index.

``init_ray`` starts (or joins, when ``RAY_ADDRESS`` is set) Ray. A local
instance listens on loopback only: an exposed Ray port runs anyone's code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


def init_ray(num_cpus: int = 0, num_gpus: int | None = None) -> None:
    """Start a loopback-only local Ray, or join the cluster named by RAY_ADDRESS.

    ``num_gpus`` (a local Ray only): the GPUs it schedules, None for those it detects;
    on a CPU machine ``num_gpus=1`` declares a logical GPU (tests of GPU scheduling).
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # With this set, Ray's node address is 127.0.0.1 and every server of a
        # single-machine instance binds loopback. Ray reads it at import time
        # (and each process it starts inherits it), so also set the constant
        # in case ray was imported before this call.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # Model actors count as workers too, so with the default limit (one worker
    # per CPU) Ray kills an idle task worker after 1 s and starts a fresh one
    # (~1 s of CPU) for the next decode task: keep idle workers for a minute.
    ray.init(num_cpus=num_cpus or None, num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=False,
             _node_ip_address="127.0.0.1",
             _system_config={"idle_worker_killing_time_threshold_ms": 60_000})


def map_unordered(fn: Callable[..., Any], items: Iterable[Any], *, executor: str = "local",
                  max_in_flight: int = 8, args: tuple = (), desc: str = "",
                  total: int | None = None, num_cpus: float = 1,
                  max_retries: int = 3) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(item, *args))`` for every item, at most ``max_in_flight`` at once."""
    bar = tqdm(total=total, desc=desc, unit="item", disable=None, leave=False)
    try:
        if executor == "local":
            for i, item in enumerate(items):
                yield i, fn(item, *args)
                bar.update()
        elif executor == "ray":
            yield from _map_ray(fn, items, args, max_in_flight, num_cpus, max_retries, bar)
        else:
            raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    finally:
        bar.close()


def _map_ray(fn, items, args, max_in_flight, num_cpus, max_retries, bar):
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    arg_refs = tuple(ray.put(a) for a in args)  # shipped once, not per task
    pending: dict[Any, int] = {}
    it = enumerate(items)
    exhausted = False
    while pending or not exhausted:
        while not exhausted and len(pending) < max_in_flight:
            try:
                i, item = next(it)
            except StopIteration:
                exhausted = True
                break
            pending[remote.remote(item, *arg_refs)] = i
        if not pending:
            break
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            yield i, ray.get(ref)
            bar.update()


def worker_count(requested: int) -> int:
    """``requested`` workers, or every CPU (of the Ray cluster if one is up) for 0."""
    if requested > 0:
        return requested
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except ImportError:
        pass
    return os.cpu_count() or 1
