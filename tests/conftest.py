"""Test harness: a real ComfyUI (in-process for unit tests, a real server for end-to-end tests)."""
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR / "scripts"))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_runtime  # noqa: E402
import random_models  # noqa: E402

comfy_runtime.import_comfy()


class _PackFolderIsNoTestPackage:
    """The pack's folder has an __init__.py (ComfyUI imports it as a package), so pytest would set it
    up as a test package by importing it under the folder's name, which fails for clone names such as
    `comfyui-tune-a-video`. Collect it as a plain folder; tests import the pack via tavlib."""

    @staticmethod
    def pytest_collect_directory(path, parent):
        if path == PACK_DIR:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_PackFolderIsNoTestPackage(), "tav-pack-folder")


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
    return random_models.random_checkpoint()


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


def pytest_sessionfinish(session, exitstatus):
    """A run in which no test passed is a failure (e.g. everything skipped or deselected)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == 0 and reporter is not None and not reporter.stats.get("passed"):
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
