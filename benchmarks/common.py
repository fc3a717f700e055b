"""Shared helpers for the benchmarks: timing, machine peak, tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pixsigma.io import write_json

RESULTS = Path(__file__).parent / "results"


def median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Every repeat's seconds of each callable, run in turn so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Median seconds of each callable, run in turn so that machine noise hits all alike."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats, warmup).items()}


def matmul_gflops(n: int = 2048, dtype=torch.float32, repeats: int = 5) -> float:
    """The machine's measured matmul throughput (GFLOP/s) at the current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cores": os.cpu_count()}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def save(name: str, payload: dict) -> Path:
    path = write_json(RESULTS / f"{name}.json", {"machine": machine(), **payload})
    print(f"saved {path}")
    return path


def run_isolated(script: str, spec: dict) -> dict:
    """Run `script --one SPEC_JSON` in a fresh process (so its peak RSS is its own) and return the
    JSON it prints last; a failed run stops the benchmark with its stderr."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
    if r.returncode:
        raise SystemExit(f"benchmark run {spec} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
