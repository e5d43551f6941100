"""The accuracy suite's category gate: pooled category, Avg and Avg(Hard) accuracies against a baseline.

Real `pytest accuracy/` runs in subprocesses on qwen-tiny and the shipped sample, three Humanities subjects
selected with -k; the baseline is written from a first run by `npuinfer baseline update`, then doctored.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.gates.accuracy import any_prompt_fitted, gate_categories, settings_differences
from npuinfer.ceval.scoring import PromptFit

REPO = Path(__file__).resolve().parents[1]
THREE = "law or art_studies or high_school_history"  # Humanities, none of them hard
TWO = "law or art_studies"
RUN_DIR = "ceval_qwen-tiny_cpu"


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def accuracy(results: Path, select: str, *args: str) -> subprocess.CompletedProcess:
    return run(["-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "-rs", "--device", "cpu",
                "--model", "qwen-tiny", "--results-dir", str(results), "-k", select, *args])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, npuinfer_cache) -> Path:
    results = tmp_path_factory.mktemp("run")
    first = accuracy(results, THREE)
    assert first.returncode == 0 and "3 passed" in first.stdout, first.stdout[-3000:]
    base = tmp_path_factory.mktemp("baselines") / "equal"
    proc = run(["-m", "npuinfer", "baseline", "update", str(results), str(base)])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (base / RUN_DIR).iterdir()) == ["cache.csv", "cache_meta.json",
                                                                 "classes_acc.json", "subject_acc.json"]
    return base


def doctor(baseline: Path, tmp_path: Path, edit) -> tuple[Path, dict]:
    """A copy of the baseline with ``edit(classes, subjects, meta)`` applied to its JSON files."""
    copy = tmp_path / "doctored"
    shutil.copytree(baseline, copy)
    files = [copy / RUN_DIR / name for name in ("classes_acc.json", "subject_acc.json", "cache_meta.json")]
    data = [json.loads(f.read_text()) for f in files]
    edit(*data)
    for f, d in zip(files, data):
        f.write_text(json.dumps(d))
    return copy, data[0]


def classes(baseline: Path) -> dict[str, float]:
    return json.loads((baseline / RUN_DIR / "classes_acc.json").read_text())


def test_an_equal_baseline_gates_every_category_and_passes(baseline, tmp_path):
    accs = classes(baseline)
    assert sorted(accs) == ["Avg", "Avg (macro)", "Humanities", "Humanities (macro)"]  # pooled, then macro
    proc = accuracy(tmp_path / "results", THREE, "--baseline", str(baseline))  # scored afresh
    assert proc.returncode == 0, proc.stdout[-3000:]
    for key in ("Humanities", "Avg"):
        assert f"{key}: category accuracy {accs[key]!r}, baseline {accs[key]!r}: passed" in proc.stdout
    assert "not gated" not in proc.stdout.lower()


def test_a_category_doctored_higher_fails_the_session_naming_it_and_both_values(baseline, tmp_path):
    accs = classes(baseline)
    doctored, new = doctor(baseline, tmp_path, lambda c, s, m: c.update(Humanities=c["Humanities"] + 0.2))
    proc = accuracy(tmp_path / "results", THREE, "--baseline", str(doctored))
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "3 passed" in proc.stdout  # every subject case passes: the category gate fails the session
    assert (f"FAILED {RUN_DIR} Humanities: category accuracy {accs['Humanities']!r} is 0.2 below the baseline "
            f"{new['Humanities']!r}") in proc.stdout
    assert f"Avg: category accuracy {accs['Avg']!r}, baseline {accs['Avg']!r}: passed" in proc.stdout


def test_a_run_over_some_subjects_of_a_category_is_not_gated_on_it_and_says_so(baseline, tmp_path):
    # Doctored, so a gate that compared the partial pooled figure would fail.
    doctored, _ = doctor(baseline, tmp_path, lambda c, s, m: c.update(Humanities=c["Humanities"] + 0.2))
    proc = accuracy(tmp_path / "results", TWO, "--baseline", str(doctored))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 passed" in proc.stdout
    assert "WARNING: Humanities: category not gated: run covers 2 of 3 subjects" in proc.stdout
    assert "WARNING: Avg: category not gated: run covers 2 of 3 subjects" in proc.stdout


def test_a_baseline_with_other_shots_is_not_gated_with_a_warning(baseline, tmp_path):
    def edit(c, s, m):
        c["Humanities"] += 0.2
        s["law"] += 0.5
        m["shots"] = 0

    doctored, _ = doctor(baseline, tmp_path, edit)
    proc = accuracy(tmp_path / "results", THREE, "--baseline", str(doctored))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 passed" in proc.stdout
    differ = "shots 0 (baseline) vs 5 (this run)"
    assert f"WARNING: categories not gated: the baseline was scored with other settings: {differ}" in proc.stdout
    assert "qwen-tiny-law: NOT GATED: the baseline" in proc.stdout and differ in proc.stdout
    assert ": passed" not in proc.stdout  # no category compared
    table = proc.stdout[proc.stdout.index("| subject"):proc.stdout.index("Every question")]
    assert table.count("not gated") == 3  # every case's baseline column


def all_right(baseline: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of the baseline whose every question was answered right (cache.csv, both accuracy files), and how
    many of its questions the real run got wrong (each a right -> wrong flip against the copy)."""
    copy = tmp_path / "all-right"
    shutil.copytree(baseline, copy)
    cache = copy / RUN_DIR / "cache.csv"
    lines = cache.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [line.split(",") for line in lines[1:]]
    wrong = sum(r[4] == "0" for r in rows)
    for r in rows:
        r[3], r[4] = r[2], "1"
    cache.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n", encoding="utf-8")
    for name in ("classes_acc.json", "subject_acc.json"):
        path = copy / RUN_DIR / name
        path.write_text(json.dumps({k: 1.0 for k in json.loads(path.read_text())}))
    return copy, wrong


def test_mcnemar_passes_subject_drops_within_chance_and_fails_a_significant_category_drop(baseline, tmp_path):
    from npuinfer.reports.paired import mcnemar_exact

    doctored, wrong = all_right(baseline, tmp_path)
    assert wrong >= 6, "the tiny model must get >= 6 of 9 wrong for a significant pooled drop"
    proc = accuracy(tmp_path / "results", THREE, "--baseline", str(doctored), "--acc-test", "mcnemar")
    # Each subject: at most 3 flips of 3 questions, p >= 0.25: within chance, every case passes.
    assert "3 passed" in proc.stdout, proc.stdout[-3000:]
    # The category pools 9 questions: `wrong` flips one way, none the other.
    p = mcnemar_exact(wrong, 0)
    assert p < 0.05 and proc.returncode == 1, proc.stdout[-3000:]
    assert (f"{wrong} question(s) right in the baseline and wrong now, 0 the reverse, of 9 paired: McNemar's exact "
            f"p = {p:.4g}, significant at --alpha 0.05") in proc.stdout
    assert f"FAILED {RUN_DIR} Humanities: category accuracy" in proc.stdout
    drop = accuracy(tmp_path / "results-drop", THREE, "--baseline", str(doctored))  # the drop limit alone
    assert "3 failed" in drop.stdout, drop.stdout[-3000:]


def test_mcnemar_without_a_baseline_cache_falls_back_to_the_drop_limit_with_a_note(baseline, tmp_path):
    doctored, _ = doctor(baseline, tmp_path, lambda c, s, m: s.update(law=s["law"] + 0.5))
    (doctored / RUN_DIR / "cache.csv").unlink()
    proc = accuracy(tmp_path / "results", THREE, "--baseline", str(doctored), "--acc-test", "mcnemar")
    assert proc.returncode == 1 and "1 failed, 2 passed" in proc.stdout, proc.stdout[-3000:]
    assert "--acc-test mcnemar: the baseline" in proc.stdout and "has no cache.csv" in proc.stdout
    assert "is 0.5 below the baseline" in proc.stdout and "(--max-acc-drop)" in proc.stdout
    assert "WARNING: --acc-test mcnemar: no cache.csv beside" in proc.stdout


def test_gate_categories_covers_avg_hard_and_only_baseline_categories():
    run_s = {"college_physics": 0.5, "operating_system": 0.25, "law": 1.0}
    run_c = {"STEM": 0.375, "Humanities": 1.0, "Avg": 0.5, "Avg(Hard)": 0.5}
    base_s = dict(run_s)
    base_c = {"STEM": 0.375, "Avg": 0.6, "Avg(Hard)": 0.5}  # no Humanities entry: not looked at
    verdicts = {v.category: v for v in gate_categories(run_s, run_c, base_s, base_c, 0.05)}
    assert sorted(verdicts) == ["Avg", "Avg(Hard)", "STEM"]
    assert verdicts["STEM"].status == verdicts["Avg(Hard)"].status == "passed"
    assert verdicts["Avg"].status == "failed" and "0.5" in verdicts["Avg"].message and "0.6" in verdicts["Avg"].message
    # The baseline has a hard subject the run lacks: Avg(Hard) and STEM are no longer comparable.
    base_s["advanced_mathematics"] = 0.0
    verdicts = {v.category: v for v in gate_categories(run_s, run_c, base_s, base_c, 1.0)}
    assert verdicts["Avg(Hard)"].status == "not gated" and "covers 1 of 2 subjects" in verdicts["Avg(Hard)"].message
    assert verdicts["STEM"].status == "not gated" and verdicts["Avg"].status == "not gated"


def test_settings_differences_name_each_setting_old_and_new():
    meta = {"template": "lmeval", "shots": 5, "split": "val", "dtype": "fp32",
            "extra": {"scoring": "prefix", "data_sha256": "aa", "data_dir": "/x"}}
    other = {**meta, "dtype": "bf16", "template": "atb",
             "extra": {"scoring": "naive", "data_sha256": "bb", "data_dir": "/elsewhere"}}
    assert settings_differences(meta, dict(meta)) == []
    assert settings_differences(meta, other) == ["template 'lmeval' (baseline) vs 'atb' (this run)",
                                                 "scoring 'prefix' (baseline) vs 'naive' (this run)",
                                                 "data_sha256 'aa' (baseline) vs 'bb' (this run)"]


def test_fit_differs_only_where_a_prompt_was_over_the_model_length():
    """A baseline from before --fit (no "fit": it fitted by dropping shots) against a run with fit truncate."""
    old = {"template": "lmeval", "shots": 5, "split": "val", "extra": {"scoring": "prefix", "data_sha256": "aa"}}
    run = {**old, "extra": {**old["extra"], "fit": "truncate"}}
    assert settings_differences(old, run) == ["fit 'shots' (baseline) vs 'truncate' (this run)"]
    assert settings_differences(old, run, prompts_fitted=False) == []  # same prompts either way: gated
    shots = {**old, "extra": {**old["extra"], "fit": "shots"}}
    assert settings_differences(old, shots) == []
    assert any_prompt_fitted([PromptFit(5, 0, 0), {"shots": 5, "dropped_shots": 0, "truncated": 0}]) is False
    assert any_prompt_fitted([PromptFit(5, 0, 0), PromptFit(3, 2, 0)]) is True
    assert any_prompt_fitted([PromptFit(5, 0, 1)]) is True
    assert any_prompt_fitted([None]) is True  # a subject with no record: cannot say, so fit counts
