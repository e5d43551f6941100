"""A baseline directory on disk: `npuinfer baseline update` is all or nothing, `npuinfer baseline verify`
checks every file against manifest.json, and the committed baseline CI gates against verifies.

Updates run on copies of the committed results/baselines/cpu-tiny (laid out like a results directory, so
a copy of it is also a run to update from). A kill is a real SIGKILL of a real update in a subprocess."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npuinfer.cli import main
from npuinfer import atomic
from npuinfer.gates import baseline_store as store
from npuinfer.gates.baseline_store import update_baseline, verify_baseline

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "baselines" / "cpu-tiny"
QWEN = "performance_qwen-tiny_cpu.csv"


def tree(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def siblings(directory: Path) -> list[str]:
    """What lies beside a baseline, less its update lock (a lock file stays: deleting it would race)."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name != f".{directory.name}.lock")


@pytest.fixture
def baseline(tmp_path) -> Path:
    copy = tmp_path / "baselines" / "cpu-tiny"
    shutil.copytree(COMMITTED, copy)
    return copy


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run whose qwen-tiny rows differ from the baseline's (every time 10% longer)."""
    run = tmp_path / "run"
    shutil.copytree(COMMITTED, run, ignore=shutil.ignore_patterns("manifest.json", "*.md"))
    with open(run / QWEN, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header, rows = list(reader.fieldnames or []), list(reader)
    for row in rows:
        row["forward_first_token_time(ms)"] = repr(float(row["forward_first_token_time(ms)"]) * 1.1)
    with open(run / QWEN, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return run


def test_the_committed_baseline_matches_its_manifest(capsys):
    checked, problems = verify_baseline(COMMITTED)
    # 6 files for each of the 8 tiny models (performance, calibration, C-Eval's four), and the served case's row
    assert problems == [] and checked == 49
    assert main(["baseline", "verify", str(COMMITTED)]) == 0
    assert f"{COMMITTED}: 49 files match manifest.json (sha256, row counts)" in capsys.readouterr().out


def test_verify_names_each_file_that_differs_from_the_manifest(baseline, capsys):
    with open(baseline / QWEN, "a", encoding="utf-8") as fh:  # a row more, as a hand edit would add
        fh.write(open(baseline / QWEN, encoding="utf-8").read().splitlines()[1] + "\n")
    (baseline / "ceval_qwen-tiny_cpu" / "classes_acc.json").unlink()
    shutil.copyfile(baseline / QWEN, baseline / "performance_other-tiny_cpu.csv")
    assert main(["baseline", "verify", str(baseline)]) == 1
    err = capsys.readouterr().err
    digest = hashlib.sha256((baseline / QWEN).read_bytes()).hexdigest()
    assert f"error: {baseline / QWEN}: sha256 {digest}, manifest.json says " in err
    assert f"error: {baseline / QWEN}: 9 rows, manifest.json says 8" in err
    assert f"error: {baseline / 'ceval_qwen-tiny_cpu' / 'classes_acc.json'}: listed in manifest.json, missing" in err
    assert f"error: {baseline / 'performance_other-tiny_cpu.csv'}: not listed in manifest.json" in err
    assert f"{baseline}: 4 problem(s) against manifest.json" in err
    (baseline / "manifest.json").unlink()
    assert verify_baseline(baseline)[1] == [f"{baseline / 'manifest.json'}: missing (a baseline directory is "
                                            "written by `npuinfer baseline update`)"]


def test_an_update_writes_the_new_files_and_a_manifest_that_verifies(baseline, run_dir):
    before = tree(baseline)
    update_baseline(run_dir, baseline)
    after = tree(baseline)
    assert after[QWEN] == hashlib.sha256((run_dir / QWEN).read_bytes()).hexdigest() != before[QWEN]
    assert after["SPREAD.md"] == before["SPREAD.md"]  # a file the update does not write stays
    assert verify_baseline(baseline)[1] == []
    assert siblings(baseline) == ["cpu-tiny"]  # nothing staged or parked is left


def test_an_update_that_fails_midway_leaves_the_old_baseline_whole(baseline, run_dir, monkeypatch):
    before = tree(baseline)
    copies = []

    def copy_then_fail(source, target, *args, **kwargs):
        if Path(source).is_relative_to(run_dir):  # the run's files; the staging copy of the baseline goes through
            if copies:
                raise OSError(28, "No space left on device (injected after the run's first file)")
            copies.append(target)
        return shutil_copyfile(source, target, *args, **kwargs)

    shutil_copyfile = shutil.copyfile
    monkeypatch.setattr(store.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        update_baseline(run_dir, baseline)
    assert copies  # the run's first file was written (into the staging copy)
    assert tree(baseline) == before and siblings(baseline) == ["cpu-tiny"]
    assert verify_baseline(baseline)[1] == []


KILL_AFTER_FIRST_FILE = """
import os, shutil, signal, sys
from npuinfer.gates import baseline_store as baseline
copy = shutil.copyfile
def copy_then_die(*args, **kwargs):
    copy(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
baseline.shutil.copyfile = copy_then_die
baseline.update_baseline(sys.argv[1], sys.argv[2])
"""


def test_an_update_killed_after_its_first_file_leaves_the_old_baseline_and_the_next_one_completes(
        baseline, run_dir):
    """The issue's case: killed after the first file, the old code left new CSVs beside an old manifest."""
    before = tree(baseline)
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_FILE, str(run_dir), str(baseline)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no cleanup ran
    assert tree(baseline) == before  # the baseline was never written to
    _, problems = verify_baseline(baseline)
    assert problems == [f"{baseline.parent / '.cpu-tiny.staging'}: left by an interrupted `npuinfer baseline "
                        "update` (the next update removes it)"]
    update_baseline(run_dir, baseline)
    assert verify_baseline(baseline)[1] == [] and siblings(baseline) == ["cpu-tiny"]
    assert tree(baseline)[QWEN] == hashlib.sha256((run_dir / QWEN).read_bytes()).hexdigest()


SLOW_FIRST_COPY = """
import shutil, sys, time
from pathlib import Path
from npuinfer.gates import baseline_store as baseline
copy = shutil.copyfile
def copy_then_wait(*args, **kwargs):
    copy(*args, **kwargs)
    if not Path(sys.argv[3]).exists():  # staging holds this update's first file: the other update starts now
        Path(sys.argv[3]).touch()
        time.sleep(3)
baseline.shutil.copyfile = copy_then_wait
baseline.update_baseline(sys.argv[1], sys.argv[2], ["qwen-tiny"])
print("wrote")
"""


def test_two_concurrent_updates_take_turns_and_both_changes_land(baseline, run_dir, tmp_path):
    """Two real processes update one baseline at once (qwen-tiny from one run, internlm-tiny from another).
    Without a lock the second deleted the first's staging directory as left by a killed update."""
    internlm = "performance_internlm-tiny_cpu.csv"
    other_run = tmp_path / "other_run"
    shutil.copytree(COMMITTED, other_run, ignore=shutil.ignore_patterns("manifest.json", "*.md"))
    header, rows = store.read_csv(other_run / internlm)
    for row in rows:
        row["forward_first_token_time(ms)"] = repr(float(row["forward_first_token_time(ms)"]) * 0.9)
    store.write_csv(other_run / internlm, header, rows)
    ready = tmp_path / "first-update-staged"
    first = subprocess.Popen([sys.executable, "-c", SLOW_FIRST_COPY, str(run_dir), str(baseline), str(ready)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ready.exists() and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "npuinfer", "baseline", "update", str(other_run),
                                 str(baseline), "--model", "internlm-tiny"], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert (first.returncode, second.returncode) == (0, 0), (err, second.stderr)
    assert tree(baseline)[QWEN] == hashlib.sha256((run_dir / QWEN).read_bytes()).hexdigest()
    assert tree(baseline)[internlm] == hashlib.sha256((other_run / internlm).read_bytes()).hexdigest()
    assert verify_baseline(baseline)[1] == [] and siblings(baseline) == ["cpu-tiny"]


class Killed(BaseException):
    """Stands for a kill: no handler for Exception runs."""


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_repaired(baseline, run_dir, monkeypatch):
    """Where renameat2 cannot exchange, the old tree is parked, then the new one renamed in; killed in between,
    verify says where the baseline is and the next update puts it back before updating."""
    before = tree(baseline)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    renames = []

    def rename_then_die(a, b):
        os_rename(a, b)
        renames.append((a, b))
        raise Killed

    os_rename = os.rename
    monkeypatch.setattr(atomic.os, "rename", rename_then_die)
    with pytest.raises(Killed):
        update_baseline(run_dir, baseline)
    monkeypatch.setattr(atomic.os, "rename", os_rename)
    parked = baseline.parent / ".cpu-tiny.previous"
    assert renames == [(baseline, parked)] and not baseline.exists() and tree(parked) == before
    _, problems = verify_baseline(baseline)
    assert problems == [f"{baseline}: not a directory ({parked} holds the baseline an interrupted update moved "
                        "aside: `npuinfer baseline update` puts it back)"]
    update_baseline(run_dir, baseline)
    assert verify_baseline(baseline)[1] == [] and siblings(baseline) == ["cpu-tiny"]
    assert tree(baseline)[QWEN] != before[QWEN] and tree(baseline)["SPREAD.md"] == before["SPREAD.md"]


def test_an_update_swaps_the_directory_in_one_step_on_linux(baseline, run_dir, monkeypatch):
    """renameat2(RENAME_EXCHANGE) is used where the system has it: no moment without a baseline directory."""
    exchanged = []
    exchange = atomic._exchange

    def spy(a, b):
        done = exchange(a, b)
        exchanged.append(done)
        if done:
            assert json.loads((b / "manifest.json").read_text())["source"] == str(run_dir.resolve())
        return done

    monkeypatch.setattr(atomic, "_exchange", spy)
    update_baseline(run_dir, baseline)
    if sys.platform != "linux":
        pytest.skip("RENAME_EXCHANGE is Linux's")
    assert exchanged == [True]
