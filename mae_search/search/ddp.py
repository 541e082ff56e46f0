"""The DDP process group of a Ray Train seed run, kept on loopback when the Ray node is local.

Ray Train's torch backend has rank 0 host the rendezvous store (a ``TCPStore``), which binds every
interface, and gloo and NCCL pick a network interface of their own. A local search's Ray instance
listens on 127.0.0.1 only (:func:`mae_search.ray_search.loopback_node`); on such a node the backend
below hosts the store on a socket already bound to 127.0.0.1 (``master_listen_fd``; the process
group's own store then shares it, ``multi_tenant``) and points gloo and NCCL at the loopback
interface. On a cluster's node (``--address``) it is Ray Train's own backend, unchanged.

Imported by the processes that build a Ray Train run (it imports torch).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psutil
import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

# Rank 0's rendezvous store and its socket, alive as long as the worker's process group.
_hosted: list[Any] = []


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and ::ffff:127.x (a dual-stack socket's view of IPv4 loopback)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def loopback_interface() -> str:
    """The name of this machine's loopback interface (``lo`` on Linux)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and is_loopback(a.address) for a in addresses):
            return name
    return "lo"


def node_address() -> str:
    """The address of the Ray node this worker runs on (127.0.0.1 for a local search's instance)."""
    return ray.util.get_node_ip_address()


def host_store_on_loopback(world_size: int, timeout_s: int) -> int:
    """On rank 0: serve the rendezvous store on 127.0.0.1 and return its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno())
    _hosted[:] = [sock, store]
    return port


def use_loopback_interface() -> None:
    """On every rank: gloo's and NCCL's own sockets on loopback (a setting of the user's own wins)."""
    interface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


class LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend; on a loopback node its process group is set up on 127.0.0.1."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        if not is_loopback(worker_group.execute_single(0, node_address)):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        port = worker_group.execute_single(0, host_store_on_loopback, len(worker_group), backend_config.timeout_s)
        worker_group.execute(use_loopback_interface)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(
                rank, _setup_torch_process_group, backend=backend, world_rank=rank, world_size=len(worker_group),
                init_method=f"tcp://127.0.0.1:{port}", timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))
        ])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig``, with the process group on loopback when the node is local."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return LoopbackTorchBackend
