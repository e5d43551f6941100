"""One atomic writer (temp file, fsync, rename) used everywhere: npuinfer.atomic."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import npuinfer
from npuinfer.atomic import create_atomic, write_atomic
from npuinfer.results.table import write_csv

PACKAGE = Path(npuinfer.__file__).parent
REPLACING = {"replace", "rename", "link"}  # os.replace / os.rename / os.link, and Path.replace / Path.rename


def replacing_calls() -> list[str]:
    """Every call in the package that puts a file in place by renaming or linking, as 'module:line name'."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REPLACING:
                base = node.func.value
                if isinstance(base, ast.Name) and base.id == "os" or node.func.attr == "rename":
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.func.attr}")
    return found


def test_only_the_atomic_module_replaces_files():
    # Directory swaps (a staged tiny checkpoint or tp shard directory renamed into place) are not file writes.
    directory_swaps = {"tiny.py", "parallel/cut.py"}
    files = [c for c in replacing_calls() if c.split(":")[0] not in directory_swaps]
    assert files and all(c.startswith("atomic.py:") for c in files), files


def test_write_atomic_fsyncs_before_the_rename_and_leaves_no_temp_file(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    target = tmp_path / "sub" / "table.csv"
    write_csv(target, ["a", "b"], [{"a": "1", "b": "2"}])  # the results tables' writer goes through it
    assert target.read_text() == "a,b\n1,2\n"
    assert events[:2] == ["fsync", "replace"]
    write_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_create_atomic_never_replaces(tmp_path):
    path = tmp_path / "meta.json"
    assert create_atomic(path, "first\n")
    assert not create_atomic(path, "second\n")
    assert path.read_text() == "first\n" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    """mkstemp makes 0600 files; renamed into place they used to leave every result unreadable to others."""
    old = os.umask(0o022)
    try:
        fresh, created, kept = tmp_path / "fresh.csv", tmp_path / "created.json", tmp_path / "kept.csv"
        write_atomic(fresh, "a\n")
        assert create_atomic(created, "{}\n")
        kept.write_text("old\n")
        os.chmod(kept, 0o640)
        write_atomic(kept, "new\n")
        os.umask(0o077)
        write_atomic(fresh, "b\n")  # replaced: keeps 0644 even under a stricter umask
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (fresh, created, kept)}
    assert modes == {"fresh.csv": "0o644", "created.json": "0o644", "kept.csv": "0o640"}
