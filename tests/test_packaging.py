"""Packaging: honest requirements (what the nodes import is what requirements.txt and pyproject declare),
short files and the floors of the layout."""
import ast
import json
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
    """One concept per short file (docs/architecture.md); tests are exempt."""
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


# --- what ComfyUI serves besides the nodes: help pages (WEB_DIRECTORY/docs) and templates (workflows/) ---

def _pack():
    return comfy_runtime.load_pack()


def test_every_node_has_a_help_page_naming_each_input():
    """web/docs/<NodeClass>.md is the node's page in the frontend's documentation panel; it must cover
    every input the node has (a new input without a line there fails here)."""
    pack = _pack()
    docs = PACK / pack.WEB_DIRECTORY / "docs"
    assert pack.WEB_DIRECTORY == "./web" and docs.is_dir()
    gaps = {}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        page = docs / f"{name}.md"
        if not page.is_file():
            gaps[name] = "no page"
            continue
        text = page.read_text()
        spec = cls.INPUT_TYPES()
        inputs = [k for section in ("required", "optional") for k in spec.get(section, {})]
        missing = [k for k in inputs if f"`{k}`" not in text]
        if missing or not text.startswith("# "):
            gaps[name] = missing or "no title"
    assert len(pack.NODE_CLASS_MAPPINGS) >= 12 and gaps == {}, f"help pages missing or incomplete: {gaps}"
    pages = {p.stem for p in docs.glob("*.md")}
    assert pages == set(pack.NODE_CLASS_MAPPINGS), f"pages for no node: {sorted(pages - set(pack.NODE_CLASS_MAPPINGS))}"


def test_help_page_images_exist_next_to_the_pages():
    """The frontend resolves a relative image against /extensions/<pack>/docs/, i.e. web/docs/."""
    docs = PACK / "web" / "docs"
    images = {(page.name, m) for page in docs.glob("*.md") for m in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text())}
    assert images, "no help page shows a picture"
    bad = [(page, src) for page, src in images if src.startswith(("/", "http")) or not (docs / src).is_file()]
    assert bad == [], f"images that do not resolve inside web/docs: {bad}"


def test_workflows_folder_holds_only_ui_graphs_each_with_a_thumbnail():
    """ComfyUI lists every *.json directly in workflows/ as a template (app/custom_node_manager.py);
    API-format graphs live in workflows/api/. The frontend shows <name>.jpg as a custom template's card."""
    top = sorted((PACK / "workflows").glob("*.json"))
    assert {p.name for p in top} == {"tav_text_to_video.json", "tav_tune_and_edit.json", "tav_video_edit.json"}
    for path in top:
        graph = json.loads(path.read_text())
        assert isinstance(graph.get("nodes"), list) and "links" in graph, f"{path.name} is not a UI graph"
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: no JPEG thumbnail"
    for path in (PACK / "workflows" / "api").glob("*.json"):
        graph = json.loads(path.read_text())
        assert all("class_type" in node for node in graph.values()), f"{path.name} is not an API graph"
