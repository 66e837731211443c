"""Latency measurement shared by ``lynx-bench`` and the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_ms(fn: Callable[[], Any], device: torch.device, repeat: int) -> list[float]:
    """``repeat`` latencies of ``fn`` in ms: CUDA events on GPU, wall clock on CPU."""
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """Median latency of ``fn`` in ms after ``warmup`` calls: CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    return statistics.median(sample_ms(fn, device, repeat))


__all__ = ["median_ms", "sample_ms", "synchronize"]
