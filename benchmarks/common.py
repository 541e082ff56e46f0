"""Shared helpers: machine description, timing, and writing a section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(step: Callable[[], None], images_per_step: int, device: torch.device,
               warmup: int = 3, repeats: int = 10) -> float:
    """Images per second of ``step`` after warm-up: median of ``repeats`` timed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return images_per_step / times[len(times) // 2]


def interleaved_throughput(steps: dict[str, Callable[[], None]], images_per_step: int, device: torch.device,
                           warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Images/s of several step functions timed in turn (A B C A B C ...), median per function.

    Interleaving makes the comparison side by side: a change in machine load
    during the run hits every variant alike instead of whichever ran then.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: images_per_step / sorted(t)[len(t) // 2] for name, t in times.items()}


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    header = "# Benchmark results\n\nWritten by the scripts in this folder; do not edit by hand.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    print(body)
