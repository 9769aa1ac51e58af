"""Puts scripts/'s purpose folders on sys.path, so a script or test imports any script by its flat name.

Scripts are grouped by purpose (env/, models/, client/, batch/, benchmarks/, toy_world/) but import
each other as plain modules (`import comfy_runtime`); a script adds scripts/ to sys.path and imports
this module. FOLDERS is also the PYTHONPATH that Ray workers get (scripts/batch/run_batch.py).
"""
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
FOLDERS = [str(SCRIPTS / name) for name in ("env", "models", "client", "batch", "benchmarks", "toy_world")]

for _folder in reversed(FOLDERS):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)
