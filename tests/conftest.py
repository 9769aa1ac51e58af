"""Test harness: a real ComfyUI (in-process for unit tests, a real server for end-to-end tests)."""
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_runtime  # noqa: E402

comfy_runtime.import_comfy()


@pytest.fixture(scope="session")
def tav():
    """This pack, imported the way ComfyUI imports a custom node (as a package)."""
    import tavlib
    return tavlib.load_pack()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on 2 shared cores: oversubscribed OpenMP threads spin; one thread stays steady."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_checkpoint():
    return comfy_runtime.random_checkpoint()


@pytest.fixture(scope="session")
def server(tmp_path_factory, random_checkpoint):
    """The real ComfyUI server, headless on 127.0.0.1, with this pack in custom_nodes."""
    base = tmp_path_factory.mktemp("comfy_base")
    srv = comfy_runtime.ComfyServer(base, checkpoints=[random_checkpoint])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        assert srv.proc.poll() is not None, "ComfyUI server still running after stop"
