"""The GPU benchmark's one command runs end to end on the CPU (--dry-run, tiny sizes), so it cannot rot.
Checks the table's shape and that every number is finite; timings are not asserted."""
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["row", "dtype", "ckpt", "ms each", "total", "unit", "peak MiB", "target"]


def test_gpu_benchmark_dry_run_prints_one_complete_table():
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run([str(ROOT / "scripts" / "benchmarks" / "benchmark_gpu.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    header, rows = lines[0], lines[2:]
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    table = [dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split("|")))) for line in rows]
    assert all(len(r) == len(COLUMNS) for r in table)

    tune = {(r["dtype"], r["ckpt"]) for r in table if r["row"] == "tune"}
    assert tune == {("bf16", "on"), ("bf16", "off"), ("fp16", "on"), ("fp16", "off")}
    assert sum(r["row"].startswith("invert 2 + sample 2") for r in table) == 1
    attention = {r["row"] for r in table if r["row"].startswith("attention ")}
    assert {"attention sdpa per-frame (unpatched)", "attention sdpa sparse_causal"} <= attention
    for r in table:
        for column in ("ms each", "total", "peak MiB"):
            value = float(r[column])
            assert math.isfinite(value) and value > 0, (r["row"], column, value)
    for r in table:  # the extrapolation is what it says: 500 steps of the measured step time
        if r["row"] == "tune":
            assert r["unit"] == "s/500 steps"
            assert math.isclose(float(r["total"]), 0.5 * float(r["ms each"]), rel_tol=0.01)
