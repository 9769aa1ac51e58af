"""Make a CUDA torchvision wheel importable on CPU-only torch.

torchvision/_meta_registrations.py registers fake kernels for its compiled ops at import time;
without those ops (CPU torch + CUDA torchvision wheel) the import dies. Guard the registrations.
"""
import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
old = "@torch.library.register_fake("
new = "@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("
if old in src:
    path.write_text(src.replace(old, new))
    print(f"patched {path}")
