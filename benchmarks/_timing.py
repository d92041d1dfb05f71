"""Shared timing helpers for the GPU benchmarks: CUDA-graph replay timing with rotating buffers."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def device_name() -> str:
    """Name of the GPU the numbers were taken on (or the CPU)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def graph_time_us(step, calls_per_graph: int = 20, warmup: int = 3, repeats: int = 30) -> float:
    """Median µs of one ``step()`` call, replayed from a CUDA graph of ``calls_per_graph`` calls (no launch gaps).

    ``step`` receives the call index, so it can rotate through several input/weight sets and stay out of L2.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(warmup):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls_per_graph):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls_per_graph)
    return sorted(times)[len(times) // 2]


def ms_per_call(call, calls: int) -> float:
    """Mean ms of ``call()`` over ``calls`` calls back to back (the GPU drained first), timed by CUDA events: what the
    GPU takes per call when the host keeps ahead of it."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """Print (and return) a Markdown table."""
    lines = ([f"### {title}", ""] if title else []) + [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict) -> Path:
    """Write results under $OUT (when set) or benchmarks/results/."""
    folder = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"device": device_name(), **payload}, indent=2))
    return path


def parse_widths(text: str) -> tuple[int, ...] | None:
    """Row widths from a ``--dims`` value (comma-separated integers of at least 2), or None (after saying why on
    stderr) when it holds anything else."""
    try:
        widths = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        widths = ()
    if not widths or min(widths) < 2:
        print(f"--dims takes comma-separated widths of at least 2, got {text!r}", file=sys.stderr)
        return None
    return widths
