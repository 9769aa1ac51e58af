"""Packaging: honest requirements (what the nodes import is what requirements.txt and pyproject declare),
short files and the floors of the layout."""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import comfy_runtime

PACK = comfy_runtime.PACK_DIR
CODE = [PACK / "__init__.py", *(p for d in ("attention_patches", "nodes", "sampling") for p in (PACK / d).rglob("*.py"))]


def names(lines):
    """Normalised distribution names of requirement lines."""
    out = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            out.add(re.split(r"[<>=~!;\[ ]", line)[0].lower().replace("_", "-"))
    return out


def third_party_imports():
    comfy_dir = comfy_runtime.find_comfyui()
    found = set()
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    comfy_own = {n for n in found if (comfy_dir / n).is_dir() or (comfy_dir / f"{n}.py").is_file()}
    return found - set(sys.stdlib_module_names) - comfy_own - {"__future__"}


def test_requirements_list_what_the_nodes_import_beyond_comfyui():
    dists = metadata.packages_distributions()
    comfy_reqs = names((comfy_runtime.find_comfyui() / "requirements.txt").read_text().splitlines())
    ours = names((PACK / "requirements.txt").read_text().splitlines())
    needed = {dists[m][0].lower().replace("_", "-") for m in third_party_imports()}
    assert needed - comfy_reqs - ours == set(), "imported but not declared"
    assert ours <= needed, f"declared but never imported: {sorted(ours - needed)}"


def test_pyproject_declares_the_same_and_never_torch():
    project = tomllib.loads((PACK / "pyproject.toml").read_text())
    deps = names(project["project"]["dependencies"])
    assert deps == names((PACK / "requirements.txt").read_text().splitlines())
    assert "torch" not in deps
    comfy = project["tool"]["comfy"]
    assert comfy["Icon"].startswith("https://") and comfy["requires-comfyui"].startswith(">=")
    assert (PACK / comfy["Icon"].rsplit("/", 1)[-1]).is_file()


MAX_LINES = 300
FLOORS = ("nodes", "sampling", "attention_patches")  # each may import only the floors after it


def test_no_python_file_outside_tests_exceeds_300_lines():
    """One concept per short file (the README's Architecture section); tests are exempt."""
    files = [PACK / "__init__.py", *(p for d in (*FLOORS, "scripts") for p in (PACK / d).rglob("*.py"))]
    long = {str(p.relative_to(PACK)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert len(files) > 20 and long == {}, f"files over {MAX_LINES} lines: {long}"


def test_floors_import_only_downwards():
    """nodes -> sampling -> attention_patches: no floor imports a floor above it (so no cycles)."""
    upward = []
    for floor_index, floor in enumerate(FLOORS):
        for path in (PACK / floor).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                    target = node.module.split(".")[0]
                    if target in FLOORS[:floor_index]:
                        upward.append(f"{path.relative_to(PACK)} imports {target}")
    assert upward == []
