"""The package's import graph, read from the source with ``ast`` (imports inside functions included):
no cycle among npuinfer modules, and in-package imports at module top."""
from __future__ import annotations

import ast
from pathlib import Path

import npuinfer

PACKAGE = Path(npuinfer.__file__).parent

# Modules allowed in-package imports inside functions (none now; add one only with the reason).
LAZY_ALLOWED: set[str] = set()


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("npuinfer",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported npuinfer module, line, at module top) for every import statement of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top) for t in dict.fromkeys(targets) if t in known and t != name]
    return found


def graph() -> dict[str, dict[str, int]]:
    mods = modules()
    return {name: {t: line for t, line, _ in imports(name, path, set(mods))} for name, path in mods.items()}


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as a path a -> b -> ... -> a, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in edges:
        if state.get(root):
            continue
        stack = [(root, iter(edges[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(edges.get(child, {}))))
                path.append(child)
    return None


def test_the_walk_sees_imports_inside_functions_and_finds_cycles(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("from .checkpoint import read_config\nfrom . import parallel\n\n\n"
                      "def f():\n    from .runtime import load_model\n    import npuinfer.tiny\n")
    known = {"npuinfer.checkpoint", "npuinfer.parallel", "npuinfer.runtime", "npuinfer.tiny"}
    assert imports("npuinfer.fake", source, known) == [
        ("npuinfer.checkpoint", 1, True), ("npuinfer.parallel", 2, True), ("npuinfer.runtime", 6, False),
        ("npuinfer.tiny", 7, False)]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None
    assert len(graph()) > 40  # every module of the package was read


def test_no_import_cycle_among_npuinfer_modules():
    edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_in_package_imports_are_at_module_top():
    mods = modules()
    lazy = [f"{name}:{line} imports {target}" for name, path in mods.items() if name not in LAZY_ALLOWED
            for target, line, at_top in imports(name, path, set(mods)) if not at_top]
    assert not lazy, "in-package imports inside functions (import at module top): " + "; ".join(lazy)


ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def unit(module: str) -> str:
    """The layer unit a module belongs to: its top folder (``ceval/``) or itself (``runtime``)."""
    parts = module.split(".")[1:] or ["__init__"]
    is_folder = len(parts) > 1 or (PACKAGE / parts[0] / "__init__.py").is_file()
    return parts[0] + "/" if is_folder else parts[0]


def layer_lines(text: str) -> list[list[str]]:
    """The units on each line of the fenced block under '## Layers' in docs/ARCHITECTURE.md."""
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    return [line.split() for line in block.splitlines() if line.strip()]


def test_folders_are_layers_in_the_order_docs_architecture_md_draws():
    """Every import goes from a unit (a folder, or a module at the top) to one on a line above it in
    docs/ARCHITECTURE.md's layer list; every unit is listed once; so the picture cannot drift from the code."""
    lines = layer_lines(ARCHITECTURE.read_text(encoding="utf-8"))
    line_of = {u: i for i, units in enumerate(lines) for u in units}
    listed = [u for units in lines for u in units]
    assert len(listed) == len(set(listed)), "a unit is listed twice in docs/ARCHITECTURE.md's layers"
    mods = modules()
    units = {unit(m) for m in mods}
    assert units <= set(line_of), f"not in docs/ARCHITECTURE.md's layers: {sorted(units - set(line_of))}"
    assert set(line_of) <= units, f"listed but not in the package: {sorted(set(line_of) - units)}"
    wrong = [f"{name} ({unit(name)}, line {line_of[unit(name)] + 1}) imports {target} ({unit(target)}, line "
             f"{line_of[unit(target)] + 1}) at line {line}"
             for name, path in mods.items() for target, line, _ in imports(name, path, set(mods))
             if unit(target) != unit(name) and line_of[unit(target)] >= line_of[unit(name)]]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_layer_check_catches_a_wrong_order():
    text = "## Layers\n```\natomic\nruntime  ceval/\n```\n"
    assert layer_lines(text) == [["atomic"], ["runtime", "ceval/"]]
    assert unit("npuinfer.ceval.scoring") == "ceval/" and unit("npuinfer.runtime") == "runtime"
    assert unit("npuinfer") == "__init__"
