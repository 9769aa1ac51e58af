"""Print the pip arguments that install CPU PyTorch here: none, or the PyTorch CPU wheel index.

    python scripts/env/torch_index.py torch==2.13.0 torchvision

Asks pip (dry run, metadata only) what the configured indexes would install. Where that pulls CUDA
packages (PyPI's Linux torch depends on nvidia-* and triton, gigabytes), prints
`--index-url https://download.pytorch.org/whl/cpu`; where it is CPU-only already (macOS, Windows, a
local CPU wheel), prints nothing.
"""
import json
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PREFIXES = ("nvidia-", "triton", "cuda-")


def pulls_cuda(requirements: list[str]) -> bool:
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--report", "-", *requirements], check=True, capture_output=True, text=True).stdout
    names = [item["metadata"]["name"].lower() for item in json.loads(report)["install"]]
    return any(name.startswith(CUDA_PREFIXES) for name in names)


if __name__ == "__main__":
    if pulls_cuda(sys.argv[1:] or ["torch"]):
        print(f"--index-url {CPU_INDEX}")
