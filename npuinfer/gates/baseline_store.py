"""Baseline storage: `npuinfer baseline update` copies a results directory's gated files (performance and
calibration CSVs, each accuracy task's JSON and cache) into a baseline directory through a staged swap, with a
manifest of their hashes and the machine they were measured on; `npuinfer baseline verify` checks a baseline against its
manifest. The gate that reads baselines is npuinfer.gates.performance; file names are npuinfer.results.naming.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from filelock import FileLock

from ..atomic import fsync_tree, recover_interrupted_swap, sibling, swap_directory
from ..device import cpu_model_name
from ..results.calibration import calibration_table
from ..ceval.report import SUBJECT_ACC
from ..ceval.run import ResultsDir, read_results_dir
from ..results.naming import CALIBRATION, PERFORMANCE, calibration_of, kind_of, model_of
from ..results.performance import BATCH
from ..results.table import read_csv, write_csv
from .performance import check_figures, figure_problems, paired_calibration

# --------------------------------------------------------------------------------------------- storing a baseline

MANIFEST = "manifest.json"
# The gate reads the first two; cache.csv (each question's row) pairs a run with the baseline (--acc-test mcnemar).
CEVAL_FILES = ("subject_acc.json", "classes_acc.json", "cache_meta.json", "cache.csv")
OPTIONAL_CEVAL_FILES = ("cache_meta.json", "cache.csv")  # a run of an older npuinfer may lack them


@dataclass
class UpdatePlan:
    """What `update_baseline` copies: (source, destination relative to the baseline) pairs, and warnings."""

    copies: list[tuple[Path, Path]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_update(run_dir: str | Path, models: Sequence[str] | None = None) -> UpdatePlan:
    """The files of a results directory that make a baseline: performance CSVs with their calibrations,
    and each accuracy task's JSON files (with the run's settings, cache_meta.json, and its cache.csv). Errors name the
    directory or file and what was expected."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"RUN_DIR {run}: not a directory")
    plan = UpdatePlan()
    wanted = set(models) if models else None
    planned: set[str] = set()  # the models something was copied for
    for csv_path in sorted(run.glob("performance_*.csv")):
        header, rows = read_csv(csv_path)
        if BATCH not in header:
            raise ValueError(f"{csv_path}: no {BATCH} column: not a performance CSV")
        model = rows[0].get("model") if rows else None
        model = model or model_of(csv_path)
        if wanted is not None and model not in wanted:
            continue
        if not any(r.get("status", "ok") == "ok" for r in rows):
            plan.warnings.append(f"{csv_path.name}: no measured (status ok) row; copied all the same")
        check_figures(csv_path, rows)
        plan.copies.append((csv_path, Path(csv_path.name)))
        planned.add(model)
        cal = calibration_of(csv_path)
        if cal.is_file():
            check_figures(cal, read_csv(cal)[1], calibration=True)
            plan.copies.append((cal, Path(cal.name)))
        elif not any(r.get("served_model") for r in rows):  # a served deployment's rows are always compared raw
            plan.warnings.append(f"{csv_path.name}: no {cal.name} beside it: the gate will compare raw times "
                                 "for this model (rerun the sweep with this npuinfer to record calibrations)")
    for acc, found in accuracy_dirs(run):
        directory = acc.parent
        if wanted is not None and found.model not in wanted:
            continue
        data = json.loads(acc.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("split") == "test":
            raise ValueError(f"{acc}: a test-split report has no accuracy; a baseline needs a val or dev run")
        planned.add(found.model)
        for name in CEVAL_FILES:
            if (directory / name).is_file():
                plan.copies.append((directory / name, Path(directory.name) / name))
            elif name not in OPTIONAL_CEVAL_FILES:
                raise ValueError(f"{directory}: no {name} (run `npuinfer report ceval {directory}` to rebuild it)")
    if wanted is not None:
        missing = sorted(wanted - planned)
        if missing:
            raise ValueError(f"RUN_DIR {run}: nothing for --model {', '.join(missing)}")
    if not plan.copies:
        raise ValueError(f"RUN_DIR {run}: no performance_<model>_<device>.csv and no <task>_<model>_<device>/"
                         "subject_acc.json (ceval_, mmlu_, ...): nothing to make a baseline of")
    return plan


def accuracy_dirs(directory: Path) -> list[tuple[Path, ResultsDir]]:
    """Each accuracy task's results folder in a directory (C-Eval's and every other task's): its subject_acc.json
    and what it is (npuinfer.ceval.run.read_results_dir)."""
    found = []
    for acc in sorted(directory.glob(f"*/{SUBJECT_ACC}")):
        parsed = read_results_dir(acc.parent)
        if parsed is not None:
            found.append((acc, parsed))
    return found


def _file_facts(path: Path) -> dict[str, object]:
    """Provenance of one copied file: its sha256, a CSV's row count, for a performance CSV its devices, torch
    and settings. `verify_baseline` checks the hash and the row count."""
    facts: dict[str, object] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if path.suffix == ".csv":
        rows = read_csv(path)[1]
        facts["rows"] = len(rows)
    if kind_of(path) == PERFORMANCE:
        for column in ("device", "device_name", "torch", "dtype", "backend", "timing", "rounds"):
            values = sorted({r.get(column, "") for r in rows} - {""})
            if values:
                facts[column] = values[0] if len(values) == 1 else values
        facts["measured"] = [min(r.get("measured_at", "") for r in rows), max(r.get("measured_at", "") for r in rows)] if rows else []
    if kind_of(path) == CALIBRATION:
        for column in ("workload", "calibration_dtype", "cpu_threads"):
            values = sorted({r.get(column, "") for r in rows} - {""})
            if values:
                facts[column] = values[0] if len(values) == 1 else values
    if path.name == "cache_meta.json":
        facts["settings"] = json.loads(path.read_text(encoding="utf-8"))
    return facts


def _host() -> dict[str, object]:
    """The machine running the update (on a cpu baseline, the one that measured it)."""

    return {"cpu": cpu_model_name(), "cpus": os.cpu_count(), "system": platform.system()}


def update_baseline(run_dir: str | Path, baseline_dir: str | Path, models: Sequence[str] | None = None
                    ) -> tuple[list[Path], list[str]]:
    """Copy a run's baseline files into ``baseline_dir`` (replacing the same files, keeping others) and
    record where they came from in its manifest.json. Returns (files written, warnings).

    All or nothing: the whole baseline directory is copied to a staging directory beside it, the run's files
    and the manifest are written there, and the staging directory then takes the baseline's place in one
    rename (`swap_directory`). An update killed at any point leaves the old baseline or the new one, complete.
    Updates of one baseline take turns on its lock, so each starts from the one before it."""
    plan = plan_update(run_dir, models)
    out = Path(baseline_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"BASELINE_DIR {out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with update_lock(out):
        return _update_locked(plan, run_dir, out)


def update_lock(out: Path) -> FileLock:
    """The lock `update_baseline` holds for the whole update (``.<name>.lock`` beside the baseline): without it
    two updates share one staging directory and each deletes the other's as left by a killed update."""
    return FileLock(sibling(out, "lock"), is_singleton=True)


def _update_locked(plan: UpdatePlan, run_dir: str | Path, out: Path) -> tuple[list[Path], list[str]]:
    recover_interrupted_swap(out)
    staging = sibling(out, "staging")
    if staging.exists():  # an update killed before its swap (no other holds the lock): the baseline was never touched
        shutil.rmtree(staging)
    try:
        if out.is_dir():
            shutil.copytree(out, staging, symlinks=True)
        else:
            staging.mkdir(parents=True)
        written, warnings = _stage_update(plan, run_dir, staging, out)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_directory(staging, out)
    return written, warnings


def _stage_update(plan: UpdatePlan, run_dir: str | Path, staging: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Write the plan's files and the manifest into ``staging`` (a copy of the baseline), all on disk."""

    import torch

    manifest_path = staging / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    files = manifest.get("files", {})
    written = []
    warnings = list(plan.warnings)
    # the rows each CSV keeps of other machines, decided before any file is replaced
    kept: dict[Path, list[dict[str, str]]] = {}
    for source, dest in plan.copies:
        if kind_of(dest) == PERFORMANCE and (staging / dest).is_file():
            cal = calibration_of(dest)
            kept[dest], kept[cal] = _other_machines(source, staging / dest, staging / cal)
            if kept[dest]:
                machines = ", ".join(sorted({r["device_name"] for r in kept[dest]}))
                warnings.append(f"{dest}: kept {len(kept[dest])} row(s) measured on {machines} (another "
                                "machine's rows stay; this machine's are replaced)")
    for source, dest in plan.copies:
        target = staging / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if kept.get(dest):
            header, rows = read_csv(source)
            extra = [c for r in kept[dest] for c in r if c not in header]
            write_csv(target, list(dict.fromkeys(header + extra)), rows + kept[dest])
        else:
            shutil.copyfile(source, target)
        written.append(out / dest)
        files[dest.as_posix()] = {"source": str(source.resolve()), "copied_at": now, **_file_facts(target)}
    devices = sorted({f"{f['device']} ({name})" if name else str(f["device"])
                      for f in files.values() if f.get("device") for name in _as_list(f.get("device_name"))})
    measured_with = sorted({str(f["torch"]) for f in files.values() if f.get("torch")})
    manifest.update({"updated_at": now, "source": str(Path(run_dir).resolve()),
                     "torch": (measured_with[0] if len(measured_with) == 1 else measured_with) or torch.__version__,
                     "python": platform.python_version(), "host": _host(),
                     "device": devices, "files": dict(sorted(files.items()))})
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_tree(staging)
    return written + [out / MANIFEST], warnings


def _as_list(value: object) -> list:
    """A manifest fact: one value, or a list when the rows hold several (several machines' rows)."""
    return list(value) if isinstance(value, list) else [value]


# --------------------------------------------------------------------------------------------- verify


def baseline_files(directory: Path) -> list[str]:
    """The files of a baseline directory that `update_baseline` writes and the manifest must list."""
    found = [p for p in directory.glob("performance_*.csv")] + [p for p in directory.glob("calibration_*.csv")]
    found += [acc.parent / name for acc, _ in accuracy_dirs(directory) for name in CEVAL_FILES]
    return sorted(p.relative_to(directory).as_posix() for p in found if p.is_file())


def verify_baseline(baseline_dir: str | Path) -> tuple[int, list[str]]:
    """Check a baseline directory against its manifest.json: every listed file present with its sha256 and,
    for a CSV, its row count; every baseline file listed. Returns (files checked, problems); each problem
    names the file and what differs. Waits for an update in progress (its lock) where the lock can be taken."""
    directory = Path(baseline_dir)
    try:
        lock = update_lock(directory)
        lock.acquire()
    except OSError:  # a read-only place: no update can be running there
        return _verify(directory)
    try:
        return _verify(directory)
    finally:
        lock.release()


def _verify(directory: Path) -> tuple[int, list[str]]:
    if not directory.is_dir():
        parked = sibling(directory, "previous")
        hint = (f" ({parked} holds the baseline an interrupted update moved aside: `npuinfer baseline update` "
                "puts it back)") if parked.is_dir() else ""
        return 0, [f"{directory}: not a directory{hint}"]
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 0, [f"{manifest_path}: missing (a baseline directory is written by `npuinfer baseline update`)"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return 0, [f"{manifest_path}: not JSON ({exc})"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return 0, [f"{manifest_path}: no \"files\" object"]
    problems = []
    for name, facts in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: listed in {MANIFEST}, missing")
            continue
        recorded = str((facts or {}).get("sha256", ""))
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if len(recorded) < 16 or not actual.startswith(recorded):
            problems.append(f"{path}: sha256 {actual}, {MANIFEST} says {recorded or 'nothing'}")
        if path.suffix == ".csv":
            table = read_csv(path)[1]
            rows = len(table)
            if facts.get("rows") != rows:
                problems.append(f"{path}: {rows} rows, {MANIFEST} says {facts.get('rows', 'nothing')}")
            if kind_of(path) in (PERFORMANCE, CALIBRATION):
                problems += figure_problems(path, table, calibration=kind_of(path) == CALIBRATION)
    for name in baseline_files(directory):
        if name not in files:
            problems.append(f"{directory / name}: not listed in {MANIFEST}")
    for leftover in (sibling(directory, "staging"), sibling(directory, "previous")):
        if leftover.exists():
            problems.append(f"{leftover}: left by an interrupted `npuinfer baseline update` (the next update "
                            "removes it)")
    return len(files), problems


def _other_machines(run_csv: Path, baseline_csv: Path, baseline_cal: Path
                    ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(performance rows, calibration rows) of a baseline file measured on machines other than the run's
    (cpu baselines keep rows per CPU model), with the calibration rows the gate pairs with them."""
    machines = {r.get("device_name", "") for r in read_csv(run_csv)[1]}
    # a row that names no machine cannot be told apart from the run's: replaced with the rest
    perf = [r for r in read_csv(baseline_csv)[1] if r.get("device_name") and r["device_name"] not in machines]
    if not perf or not baseline_cal.is_file():
        return perf, []
    table = calibration_table(baseline_cal)
    calibrations = table.rows()
    paired = (paired_calibration(table, calibrations, r) for r in perf)
    kept = {id(c) for c in paired if c is not None}
    return perf, [c for c in calibrations if id(c) in kept]
