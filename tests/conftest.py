"""Shared fixtures: a very small config so unit tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

from mae_search.config import TrainConfig

# make test runs two tests at a time on 2 cores (pytest -n 2). Two torch processes at 2 threads each, 4
# threads on 2 cores, ran 3.7x slower than at one thread each (2 epochs of the tiny trial in two processes
# at once: 164 s against 44 s, 2026-12-05): OpenMP's threads spin waiting for each other. So a test process
# takes one thread when xdist runs several, and both cores when it runs alone (pytest without -n).
torch.set_num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2)
TEST_THREADS = torch.get_num_threads()

# Ray starts its workers at nice 15, so that they yield to everything else on the machine. Here everything
# else is the test running beside (make test runs two at a time): with the pre-training test computing in
# its pytest process at nice 0, a search's reference-row tasks got 6 CPU-seconds in 3 minutes (py-spy and
# ps, 2026-12-05), and one end-to-end test per run took about 2 minutes longer than alone. At 0 the two
# tests share the cores evenly. Every process a test starts (the CLI, ray start, Ray's raylet) inherits it.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """The tests share one process: one that narrows torch's threads (a one-core benchmark does) gives
    them back, so the tests after it are not slowed (the pre-training test took 290 s on one thread)."""
    yield
    torch.set_num_threads(TEST_THREADS)


def micro_config(**overrides) -> TrainConfig:
    base = TrainConfig.from_dict(
        {
            "model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                      "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
            "data": {"num_train": 128, "num_test": 64},
            "eval": {"probe": {"epochs": 2}, "grid_images": 4, "finetune": {"epochs": 1, "batch_size": 16}},
            "optim": {"blr": 5e-3, "warmup_epochs": 0.5},
            "epochs": 2,
            "batch_size": 32,
        }
    )
    return base.with_overrides(overrides) if overrides else base


@pytest.fixture
def micro_cfg() -> TrainConfig:
    return micro_config()


# ----------------------------------------------------------------------------- end-to-end helpers

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

MICRO_BASE = """
base:
  epochs: {epochs}
  batch_size: 32
  model: {{img_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2,
          decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}}
  optim: {{blr: 5.0e-3, warmup_epochs: 0.5}}
  data: {{num_train: {num_train}, num_test: 64}}
  eval: {{probe: {{epochs: 2}}, grid_images: 4, finetune: {{epochs: 1, batch_size: 16}}}}
"""


# blr 5e-3 learns; 1e-7 cannot. Evaluated first and in that order (one trial at a time), ASHA
# must stop the second at its first rung because its loss is far above the first's.
ASHA_BLR_BODY = """
dimensions:
  optim.blr: {{loguniform: [1.0e-7, 1.0e-2]}}
initial_points:
  - {{optim.blr: 5.0e-3}}
  - {{optim.blr: 1.0e-7}}
metric: loss
mode: min
num_samples: {num_samples}
sampler: tpe
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
max_concurrent_trials: 1
"""


def micro_space(tmp_path: Path, name: str, body: str, epochs: int = 3, num_train: int = 256) -> Path:
    """Write a search space with a micro model (seconds per epoch) and return its path."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + MICRO_BASE.format(epochs=epochs, num_train=num_train) + body)
    return path


def cli(*args: str, timeout: float = 600, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run ``mae-search ARGS`` as a user would, in a fresh interpreter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run([sys.executable, "-m", "mae_search.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"mae-search {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def cli_popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mae_search.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def start_ui(storage: Path, port: int, timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """`mae-search ui` in a child process; returns it and the line that announced the URL (or "")."""
    import time

    proc = cli_popen("ui", "--storage", str(storage), "--port", str(port))
    deadline = time.time() + timeout_s
    line = ""
    while time.time() < deadline and "MLflow UI: http" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    return proc, line


def free_port() -> int:
    """A TCP port free on every interface now, for a server a test starts.

    Drawn from 20000-32767, below the kernel's ephemeral range (32768 and up), where every port-0 bind
    and outgoing connection of the other tests' Ray processes takes its port: an ephemeral port free now
    was taken again before a `ray start` head's agent bound it, and that head never accepted a job.
    """
    import random
    import socket

    for _ in range(1000):
        port = random.randrange(20_000, 32_768)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def descendants_titled(pid: int, title: str) -> list[int]:
    """The processes under ``pid`` whose command line starts with ``title`` (a search's own Ray workers: its
    local instance's processes descend from it), so a test kills its own, never those of a test running
    beside it."""
    import psutil

    def cmdline(proc: psutil.Process) -> str:
        try:
            return " ".join(proc.cmdline())
        except psutil.Error:  # it ended while we looked
            return ""

    return [p.pid for p in psutil.Process(pid).children(recursive=True) if cmdline(p).startswith(title)]


def start_ray_head(*extra: str, dashboard_port: int | None = None, env: dict[str, str] | None = None
                   ) -> tuple[int, str]:
    """`ray start --head` on ports of its own (GCS, dashboard, its agent, the client server), so it can run
    beside the other tests' Ray instances; returns its GCS port and its address (``ip:port``)."""
    import re

    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run(
        [ray_cli, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard_port or free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}", "--num-cpus=2",
         *extra], capture_output=True, text=True, timeout=180, env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    address = re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr)
    assert address, started.stdout[-2000:]
    return port, address.group(1)


def stop_ray_head(port: int) -> None:
    """Kill the processes of the Ray cluster whose GCS listens on ``port``, and everything they started
    (workers, agents, a job's driver), and nothing else: `ray stop --force` would take down every test's
    Ray instance on the machine."""
    import psutil

    def of_this_cluster(args: list[str]) -> bool:
        return any(a == f"--gcs_server_port={port}" or (a.startswith(("--gcs-address=", "--address="))
                                                         and a.endswith(f":{port}")) for a in args)

    ours = []
    for proc in psutil.process_iter():
        try:
            if of_this_cluster(proc.cmdline()):
                ours += [proc, *proc.children(recursive=True)]
        except psutil.Error:  # it ended while we looked
            continue
    for proc in ours:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(ours, timeout=30)
