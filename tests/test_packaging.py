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


def scripts_import_graph():
    """{module: {script modules it imports}} over scripts/ (lazy imports inside functions included)."""
    files = {p.stem: p for p in (PACK / "scripts").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & set(files) - {name}
    return graph


def test_scripts_sit_in_purpose_folders_with_unique_names():
    """Scripts import each other by flat name (scripts/_paths.py), so a name may exist only once."""
    import _paths

    folders = {Path(f).name for f in _paths.FOLDERS}
    scripts = [p.relative_to(PACK / "scripts") for p in (PACK / "scripts").rglob("*.py")]
    loose = [str(p) for p in scripts if len(p.parts) == 1 and p.name != "_paths.py"]
    stray = [str(p) for p in scripts if len(p.parts) > 1 and p.parts[0] not in folders]
    stems = [p.stem for p in scripts]
    assert loose == [] and stray == [], f"scripts outside the purpose folders {sorted(folders)}: {loose + stray}"
    assert len(stems) == len(set(stems)), f"duplicate script names: {sorted(stems)}"
    assert {"comfy_runtime", "random_models", "run_workflow", "run_batch", "toy_world_edit"} <= set(stems)


def test_scripts_import_graph_has_no_cycle():
    """E.g. comfy_runtime must not import random_models, which imports comfy_runtime."""
    graph = scripts_import_graph()
    assert "comfy_runtime" in graph["random_models"], "the check below would be vacuous"
    done, cycles = set(), []

    def visit(name, path):
        if name in path:
            cycles.append(" -> ".join(path[path.index(name):] + [name]))
            return
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == [], f"import cycles in scripts/: {cycles}"
