"""bench/ is the suite and nothing else; the one-off comparison scripts in comparisons/ use npuinfer's public names
only, keep their dated figures in docs/MEASUREMENTS.md (each docstring points at its section) and name no fixed
path of a development machine."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPARISONS = REPO / "comparisons"
SCRIPTS = sorted(COMPARISONS.glob("*.py"))
MEASUREMENTS = REPO / "docs" / "MEASUREMENTS.md"
SUITE = {"test_performance.py", "test_max_batch.py", "test_serving.py"}
SERVED_ONLY = {"test_serving.py"}  # its cases exist under --backend openai only (deselected otherwise)

# a fixed location on one machine, or a lock-file convention of a shared one
MACHINE_PATH = re.compile(r"(?<![\w.$])/(?:work|tmp|data|home|root|mnt)/|\bflock\b")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors() -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in MEASUREMENTS.read_text().splitlines() if line.startswith("#")}


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""


def test_bench_holds_the_suite_and_comparisons_the_scripts():
    assert {p.name for p in (REPO / "bench").glob("*.py")} == SUITE
    assert {p.stem for p in SCRIPTS} >= {"ceval_prefix_vs_naive", "decode_vs_hf", "false_alarm", "in_turn",
                                         "kernels_fused_vs_plain", "overhead", "quant_vs_float", "realsize_vs_hf"}
    listed = (COMPARISONS / "README.md").read_text()
    assert [p.name for p in SCRIPTS if f"`{p.name}`" not in listed] == []


def test_pytest_collects_only_the_suite_from_bench():
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--co", "-q", "-p", "no:cacheprovider",
                           "--model", "qwen-tiny", "--batch-sizes", "1", "--case-pairs", "8x4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("bench/") and "::" in line]
    assert {node.split("::")[0] for node in nodes} == {f"bench/{name}" for name in SUITE - SERVED_ONLY}, nodes


def imported(module: str, name: str):
    """What ``from module import name`` binds; ImportError when it names nothing there."""
    parent = importlib.import_module(module)
    return getattr(parent, name) if hasattr(parent, name) else importlib.import_module(f"{module}.{name}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_imports_only_public_names_that_exist(script):
    tree = ast.parse(script.read_text())
    modules = {}  # local name -> the npuinfer module bound to it
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "npuinfer":
            private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            for alias in node.names:
                if inspect.ismodule(obj := imported(node.module, alias.name)):
                    modules[alias.asname or alias.name] = obj.__name__
        elif isinstance(node, ast.Import):
            private += [a.name for a in node.names
                        if a.name.split(".")[0] == "npuinfer" and any(p.startswith("_") for p in a.name.split("."))]
    for node in ast.walk(tree):  # e.g. dummy._something, dummy imported above
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append(f"{modules[node.value.id]}.{node.attr}")
    assert private == [], f"{script.name} uses private names of npuinfer"


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name != "in_turn.py"], ids=lambda p: p.name)
def test_a_script_says_how_to_run_it_and_points_at_its_measurements(script):
    doc = docstring(script)
    assert f"python comparisons/{script.name}" in doc
    pointed = re.findall(r"docs/MEASUREMENTS\.md#([\w-]+)", doc)
    assert pointed and set(pointed) <= anchors(), f"{script.name}: {pointed} not among {sorted(anchors())}"
    assert not re.search(r"^\|[-| ]+\|$", doc, re.M), f"{script.name}: a table in the docstring"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", doc), f"{script.name}: a dated measurement in the docstring"


@pytest.mark.parametrize("path", [*SCRIPTS, COMPARISONS / "README.md", MEASUREMENTS, REPO / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_fixed_machine_path_or_lock_file_in_scripts_or_docs(path):
    text = path.read_text()
    lines = text.splitlines()
    if path.name == "README.md" and path.parent == REPO:  # the top README: only the lines about these scripts
        lines = [line for line in lines if "comparisons/" in line]
    assert [line for line in lines if MACHINE_PATH.search(line)] == []


def test_readme_links_into_measurements_resolve():
    for doc in (REPO / "README.md", COMPARISONS / "README.md"):
        linked = re.findall(r"MEASUREMENTS\.md#([\w-]+)", doc.read_text())
        assert linked and set(linked) <= anchors(), (doc, linked)


def test_every_script_starts_and_prints_its_help():
    """Each script's top-level imports resolve and its options parse (--help), all in one interpreter."""
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(COMPARISONS)!r})\n"
        "failed = []\n"
        f"for path in {[str(p) for p in SCRIPTS if p.name != 'in_turn.py']!r}:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "        failed.append((path, 'no exit'))\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None):\n"
        "            failed.append((path, e.code))\n"
        "print('FAILED', failed)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED []" in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("usage:") == len(SCRIPTS) - 1
