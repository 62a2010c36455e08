"""Ground truth for memory traces: the c10 CPU allocator's running total, read from the profiler's Allocation events.

``torch.profiler.profile(profile_memory=True)`` reports every CPU allocation and free made while it runs, each with
the allocator's running total of bytes allocated *since profiling started* (frees of older blocks are not counted).
The peak of that total is the real peak of what the measured code allocated — unlike RSS, which also counts freed
heap pages the C library has not returned and is 2–9× larger on this workload (specs/memory_estimator.md §3.2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class AllocatorPeak:
    """Filled in when the ``cpu_allocator_peak`` block exits."""

    peak: int = 0  # bytes above the state at entry
    allocations: int = 0


@contextlib.contextmanager
def cpu_allocator_peak() -> Iterator[AllocatorPeak]:
    """Measure the peak of CPU allocator bytes allocated inside the block (net of frees inside it)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    result = AllocatorPeak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.total_allocated))
    events.sort(key=lambda e: e[0])
    result.allocations = len(events)
    result.peak = max((total for _, total in events), default=0)
