"""The Ray cluster a search runs on: joined or started on loopback, and what it can hold at once.

A local instance listens on loopback only (:func:`loopback_node`); a cluster
given by ``--address`` (or ``RAY_ADDRESS``) is joined with Ray's defaults.
:func:`plan_concurrency` caps concurrent trials by the cluster's CPUs and GPUs
so no trial waits forever for workers that cannot be placed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from mae_search.config import ConfigError
from mae_search.search.space import SearchSpace

# Ray's switch for its single-machine mode (see loopback_node).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# The Tune-side driver of a trial only waits on its seeds' runs. It takes no
# CPU (Tune refuses an empty bundle, so it holds a token 1 MB of memory), which
# leaves every CPU to the training workers (see plan_concurrency), and it runs on
# the head node, beside the search's driver: losing a worker node then costs the
# seeds that trained there (Ray retries them from their checkpoints), never a
# trial's driver and its queue.
HEAD_NODE_RESOURCE = "node:__internal_head__"
DRIVER_BUNDLE = {"memory": 1024 * 1024, HEAD_NODE_RESOURCE: 0.001}

@dataclass
class ClusterPlan:
    """How many trials can run at once without any of them waiting forever for its workers."""

    concurrency: int
    cpus: float
    gpus: float
    parallel_seeds: int = 1  # seeds of one seed-averaged trial that train at once


def plan_concurrency(space: SearchSpace, cluster: dict[str, float]) -> ClusterPlan:
    """Cap concurrent trials by what the cluster can actually hold.

    Each seed reserves ``workers x (cpus, gpus)``: in the trial's placement
    group when it trains as a Ray task, in a placement group of its own when it
    trains as a Ray Train run; the Tune-side driver of a trial takes no CPU.
    Letting Tune start more trials than fit makes the extra Train worker groups
    wait until Train's start-up timeout, which on a 2-core laptop looks like a
    hang.
    """
    res = space.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    need_cpu = res.workers * res.cpus_per_worker
    need_gpu = res.workers * res.gpus_per_worker
    fits = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu > 0:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"search '{space.name}': a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU "
            f"but the cluster has {cpus:g} CPU and {gpus:g} GPU (lower resources: in the space file, or join a "
            f"larger cluster with --address)"
        )
    # A seed-averaged trial trains its seeds side by side when they fit, else in turns; trials share the rest.
    parallel_seeds = min(space.seeds_per_trial, fits)
    concurrency = min(space.max_concurrent_trials, max(1, fits // parallel_seeds))
    return ClusterPlan(concurrency=concurrency, cpus=cpus, gpus=gpus, parallel_seeds=parallel_seeds)


def local_resources(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray instance started here will have, known before it starts (for plan_concurrency)."""
    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def init_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Join ``address`` (``auto``, ``ray://host:10001``; else ``RAY_ADDRESS``), or start a local instance.

    A local instance listens on loopback only; other interfaces belong to a cluster that is joined.
    Returns a one-line description of the cluster for the user.
    """
    if ray.is_initialized():
        return describe_cluster("Ray")
    address = address or os.environ.get("RAY_ADDRESS")  # where ray.init would go too (a Ray job sets it)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers' output (Ray Train's per-report lines, controller notices) stays in Ray's log files.
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard process also serves the State API, which Train V2's
        # placement-group cleaner needs to notice a finished trial.
        with loopback_node():
            # "local": a new instance even when `ray start` ran on this machine (ray.init would join that)
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return describe_cluster(f"Ray: joined the cluster at {address}" if address else "Ray: started a local instance")


@contextmanager
def loopback_node() -> Iterator[None]:
    """While a local Ray instance starts inside, give its node the address 127.0.0.1.

    Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, every worker) to all interfaces
    unless the node's address is 127.0.0.1, and on Linux it takes that address from the route
    out: ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into it. Ray's single-machine
    mode, the default on macOS and Windows and switched by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    uses 127.0.0.1. The processes ``ray.init`` starts inherit the variable; the driver read it at
    import, so its copy is set too. Both are put back afterwards, so a later ``--address`` join in
    the same process is unaffected. Token authentication stays on as well
    (tests/test_ray_security.py checks both).
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(LOCAL_ONLY_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env


def describe_cluster(prefix: str) -> str:
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return f"{prefix} ({nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)"


def log_ray_to(path: Path) -> Path:
    """Send Ray's driver-side log records (Tune, Train) to a file beside the results instead of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # ray.init resets the "ray" logger's handlers, so its sub-loggers get the file too.
    for name in ("ray", "ray._private", "ray.tune", "ray.train", "ray.util", "ray.air"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    return path
