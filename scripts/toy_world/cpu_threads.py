"""How many CPU threads a toy-world job should use: one per free core, never more than the cores.

On a busy machine more threads than free cores do not add speed: they wait on each other (OpenMP threads
spin) and multiply the CPU time (measured in issue 29: ~12 s of CPU per build step with 2 threads on 2
busy cores against ~1.7 s). Free cores = cores - the 1-minute load average, rounded, at least 1.
"""
from __future__ import annotations

import os
import sys


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


def free_cores(n_cores: int | None = None, load_avg: float | None = None) -> int:
    """round(cores - load), clamped to 1..cores."""
    n_cores = cores() if n_cores is None else n_cores
    load_avg = load() if load_avg is None else load_avg
    return max(1, min(n_cores, int(n_cores - load_avg + 0.5)))


def choose(requested: int | None = None, log=None, what: str = "this job") -> int:
    """`requested` (clamped to 1..cores) or free_cores(); logs the load, the cores and the choice."""
    n, avg = cores(), load()
    threads = max(1, min(n, requested)) if requested else free_cores(n, avg)
    how = "as asked" if requested else "one per free core"
    (log or (lambda s: print(s, file=sys.stderr, flush=True)))(
        f"{what}: load {avg:.2f} on {n} cores -> {threads} thread(s) ({how}; --threads N to choose)")
    return threads


if __name__ == "__main__":  # scripts/demo.sh: print the thread count for this machine's load now
    print(choose(int(sys.argv[1]) if len(sys.argv) > 1 else None, what="demo"))
