"""How many CPU threads a toy-world job should use (one per free core, never more than the cores), and
whether this CPU computes bf16 fast.

On a busy machine more threads than free cores do not add speed: they wait on each other (OpenMP threads
spin) and multiply the CPU time (measured in issue 29: ~12 s of CPU per build step with 2 threads on 2
busy cores against ~1.7 s). Free cores = cores - the load, rounded, at least 1; the load is the lower of the
1-minute load average and the cores busy right now (/proc/stat over half a second): the average still counts
a job that just ended (the demo's environment install), which once made the demo edit take one thread on two
idle cores (5.3 min instead of 3.2).
"""
from __future__ import annotations

import os
import sys
import time


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _cpu_times(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs, or None where there is no /proc/stat."""
    try:
        with open(stat) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def busy_cores(before: tuple[int, int], after: tuple[int, int], n_cores: int) -> float:
    """How many cores were busy between two (idle, total) samples of /proc/stat."""
    total = after[1] - before[1]
    return 0.0 if total <= 0 else n_cores * (1 - (after[0] - before[0]) / total)


def current_load(n_cores: int | None = None, interval: float = 0.5) -> float:
    """min(1-minute load average, cores busy over the next `interval` seconds) (the average where the OS
    has no /proc/stat)."""
    n_cores = cores() if n_cores is None else n_cores
    before = _cpu_times()
    if before is None:
        return load()
    time.sleep(interval)
    after = _cpu_times()
    return min(load(), busy_cores(before, after, n_cores)) if after else load()


def free_cores(n_cores: int | None = None, load_avg: float | None = None) -> int:
    """round(cores - load), clamped to 1..cores (load: current_load() unless given)."""
    n_cores = cores() if n_cores is None else n_cores
    load_avg = current_load(n_cores) if load_avg is None else load_avg
    return max(1, min(n_cores, int(n_cores - load_avg + 0.5)))


def choose(requested: int | None = None, log=None, what: str = "this job") -> int:
    """`requested` (clamped to 1..cores) or free_cores(); logs the load, the cores and the choice."""
    n, avg = cores(), load()
    if requested:
        threads, how = max(1, min(n, requested)), "as asked"
    else:  # the half-second sample only where it decides
        now = current_load(n)
        threads, how = free_cores(n, now), f"one per free core; {now:.2f} busy now"
    (log or (lambda s: print(s, file=sys.stderr, flush=True)))(
        f"{what}: load {avg:.2f} (1-min average) on {n} cores -> {threads} thread(s) ({how}; --threads N to choose)")
    return threads


def fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), where bf16 autocast is faster
    than fp32 (measured on the toy UNet, AVX512-BF16: 0.79 s against 1.38 s of CPU per 8-frame tuning step);
    without them bf16 is emulated and slower."""
    try:
        with open(cpuinfo) as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:  # not Linux: assume not
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


if __name__ == "__main__":  # scripts/demo.sh: print the thread count for this machine's load now
    print(choose(int(sys.argv[1]) if len(sys.argv) > 1 else None, what="demo"))
