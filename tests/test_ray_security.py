"""A local search's Ray instance listens on loopback only, and refuses callers without the user's token."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mae_search.search.cluster import LOCAL_ONLY_ENV, loopback_node
from mae_search.search.ddp import is_loopback, loopback_interface

# Started in a fresh interpreter, so that this Ray instance is the only one the script knows.
START_LOCAL = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    import psutil, ray, ray.train, ray.train.torch
    import torch, torch.distributed as dist
    from mae_search.search.ddp import LoopbackTorchConfig
    from mae_search.search.cluster import init_ray

    def listening(proc):
        try:
            return [(proc.name(), c.laddr.ip, c.laddr.port)
                    for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            return []

    def ddp_rank(config):  # a 2-worker DDP group, as a seed run with workers: 2 makes
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        out = {"sum": total.item(), "listening": listening(psutil.Process())}
        with open(os.path.join(config["dir"], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(out, f)

    init_ray(None, 2)
    ray.get(ray.remote(lambda: 1).remote())  # a worker, with its own gRPC server
    me = psutil.Process()
    print("LISTENERS", json.dumps([x for p in [me] + me.children(recursive=True) for x in listening(p)]))
    out_dir = tempfile.mkdtemp()
    ray.train.torch.TorchTrainer(
        ddp_rank, train_loop_config={"dir": out_dir}, torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=out_dir)).fit()
    ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in (0, 1)]
    print("DDP", json.dumps(ranks))
    # A client on this machine (another user's, say), in Ray's single-machine mode to reach loopback.
    join = "import sys, ray; ray.init(address=sys.argv[1]); print('JOINED')"
    for mode in ("disabled", "token"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        out = subprocess.run([sys.executable, "-c", join, ray.get_runtime_context().gcs_address],
                             env={**env, "RAY_AUTH_MODE": mode}, capture_output=True, text=True, timeout=120)
        print(mode, "JOINED" in out.stdout, "InvalidAuthToken" in out.stderr)
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_local_instance_listens_on_loopback_only_and_refuses_a_caller_without_the_token():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != LOCAL_ONLY_ENV}
    env["RAY_TRAIN_V2_ENABLED"] = "1"
    out = subprocess.run([sys.executable, "-c", START_LOCAL], env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()

    def reported(tag: str):
        return json.loads(next(line for line in lines if line.startswith(tag)).split(" ", 1)[1])

    listeners = reported("LISTENERS")
    names = {name for name, _, _ in listeners}
    # The GCS, the raylet (node manager and object manager), a worker, the dashboard and its agents.
    assert {"gcs_server", "raylet"} <= names and len(listeners) >= 8, listeners
    assert [entry for entry in listeners if not is_loopback(entry[1])] == [], listeners
    # A DDP group's rendezvous store (rank 0) and gloo's sockets (each rank) are on loopback too.
    ranks = reported("DDP")
    assert [rank["sum"] for rank in ranks] == [3.0, 3.0], ranks  # the all-reduce went through them
    ddp_listeners = [entry for rank in ranks for entry in rank["listening"]]
    assert len(ranks[0]["listening"]) > len(ranks[1]["listening"]) >= 1, ranks  # rank 0 also hosts the store
    assert [entry for entry in ddp_listeners if not is_loopback(entry[1])] == [], ranks
    assert "disabled False True" in lines, out.stdout + out.stderr[-2000:]  # refused, for want of the token
    assert "token True False" in lines, out.stdout + out.stderr[-2000:]  # the same client with it joins
    assert (Path.home() / ".ray" / "auth_token").stat().st_size > 0  # made by the first local instance


def test_loopback_node_gives_ray_the_loopback_address_and_puts_everything_back(monkeypatch):
    from ray._private import ray_constants, services, worker

    monkeypatch.delenv(LOCAL_ONLY_ENV, raising=False)
    monkeypatch.setattr(worker, "_global_node", None)  # as before a first ray.init
    before = services.get_node_ip_address()
    with loopback_node():
        assert services.get_node_ip_address() == "127.0.0.1"
        assert os.environ[LOCAL_ONLY_ENV] == "0"  # for the processes ray.init starts
    assert LOCAL_ONLY_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER
    assert services.get_node_ip_address() == before  # a later --address join sees the real address


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_the_loopback_interface_is_the_one_holding_127_0_0_1():
    import psutil

    addresses = psutil.net_if_addrs()[loopback_interface()]
    assert "127.0.0.1" in [a.address for a in addresses]


def test_init_ray_starts_a_local_instance_on_loopback_and_joins_an_address_as_it_is(monkeypatch):
    """Which way init_ray goes, and what the node's address is while ray.init runs (ray.init recorded)."""
    import ray

    from mae_search.search import cluster

    calls = []

    def record_init(**kwargs):
        calls.append((kwargs.get("address"), os.environ.get(LOCAL_ONLY_ENV)))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", record_init)
    monkeypatch.setattr(cluster, "describe_cluster", lambda prefix: prefix)
    monkeypatch.delenv(LOCAL_ONLY_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")  # init_ray sets it; the test leaves the env as it was
    assert cluster.init_ray(None, 2) == "Ray: started a local instance"
    assert cluster.init_ray("auto") == "Ray: joined the cluster at auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # as inside a Ray job
    assert cluster.init_ray(None) == "Ray: joined the cluster at 10.0.0.5:6379"
    assert calls == [("local", "0"), ("auto", None), ("10.0.0.5:6379", None)]
    assert LOCAL_ONLY_ENV not in os.environ
