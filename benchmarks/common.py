"""Shared helpers: machine description, timing, and writing a section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class SideBySide:
    """Per-round step times of several variants timed in the same rounds."""

    images_per_step: int
    times: dict[str, list[float]]

    def images_per_s(self, name: str) -> float:
        return self.images_per_step / statistics.median(self.times[name])

    def ratio(self, name: str, baseline: str) -> tuple[float, float, float]:
        """Speed of ``name`` relative to ``baseline``: median, 25th and 75th percentile of per-round ratios.

        Each round times every variant once, so a ratio within a round compares
        steps run seconds apart; machine load that drifts over the run cancels.
        """
        ratios = sorted(b / a for a, b in zip(self.times[name], self.times[baseline], strict=True))
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        return median, q1, q3


def side_by_side(steps: dict[str, Callable[[], None]], images_per_step: int, device: torch.device,
                 warmup: int = 3, rounds: int = 10, seed: int = 0) -> SideBySide:
    """Time several step functions in rounds, each round running every one once in a fresh random order.

    Interleaving makes the comparison side by side: a change in machine load
    hits every variant alike instead of whichever ran then; shuffling the order
    keeps any "runs after X" effect from favouring one variant.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    order, rng = list(steps), random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return SideBySide(images_per_step, times)


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
