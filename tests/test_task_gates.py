"""The baseline gate of every task, in real `pytest accuracy/` runs (subprocesses, qwen-tiny): MMLU (multiple
choice) and GSM8K (generation) gated per subject and per category of their own task files, with --max-acc-drop
and with --acc-test mcnemar --alpha; and a user's task file (--task PATH) run end to end, resumed, gated and
compared. The data are synthetic copies in the official layouts (npuinfer.tasks.synth), 8 questions a subject."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.ceval.cache import read_cache
from npuinfer.reports.paired import mcnemar_exact
from npuinfer.tasks.synth import write_cmmlu, write_gsm8k, write_mmlu

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["formal_logic", "philosophy", "anatomy"]  # MMLU: Humanities, Humanities, STEM
MMLU_DIR, GSM8K_DIR = "mmlu_qwen-tiny_cpu", "gsm8k_qwen-tiny_cpu"


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_mmlu(root / "mmlu", 8, subjects=SUBJECTS)
    write_gsm8k(root / "gsm8k", 10, 8)
    return root


def accuracy(results: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu", "--model", "qwen-tiny",
                "--results-dir", str(results), "--task", "mmlu", "--task-dir", f"mmlu={data / 'mmlu'}",
                "--task", "gsm8k", "--task-dir", f"gsm8k={data / 'gsm8k'}", "--max-gen-toks", "8", *args])


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory, npuinfer_cache) -> Path:
    base = tmp_path_factory.mktemp("base")
    first = accuracy(base, data)
    assert first.returncode == 0 and "4 passed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    return base


def doctored(baseline: Path, tmp_path: Path, edits: dict[str, dict[str, dict[str, float]]]) -> Path:
    """A copy of the baseline with accuracies raised: {run dir: {json file: {name: added}}}."""
    copy = tmp_path / "doctored"
    shutil.copytree(baseline, copy)
    for run_dir, files in edits.items():
        for name, added in files.items():
            path = copy / run_dir / name
            accs = json.loads(path.read_text())
            path.write_text(json.dumps({k: v + added.get(k, 0.0) for k, v in accs.items()}))
    return copy


def classes(baseline: Path, run_dir: str) -> dict[str, float]:
    return json.loads((baseline / run_dir / "classes_acc.json").read_text())


def test_an_equal_baseline_gates_every_tasks_own_categories_and_passes(baseline, data, tmp_path):
    proc = accuracy(tmp_path / "run", data, "--baseline", str(baseline))
    assert proc.returncode == 0 and "4 passed" in proc.stdout, proc.stdout[-3000:]
    mmlu, gsm8k = classes(baseline, MMLU_DIR), classes(baseline, GSM8K_DIR)
    for key in ("Humanities", "STEM", "Avg"):
        assert f"{key}: category accuracy {mmlu[key]!r}, baseline {mmlu[key]!r}: passed" in proc.stdout
    for key in ("All", "Avg"):  # GSM8K has no subject table: its one subject, overall
        assert f"{key}: category accuracy {gsm8k[key]!r}, baseline {gsm8k[key]!r}: passed" in proc.stdout
    assert proc.stdout.count("Category gate against") == 2 and "not gated" not in proc.stdout.lower()


def test_drops_fail_per_subject_and_per_category_within_max_acc_drop_they_pass(baseline, data, tmp_path):
    copy = doctored(baseline, tmp_path, {
        MMLU_DIR: {"classes_acc.json": {"Humanities": 0.2}, "subject_acc.json": {"philosophy": 0.2}},
        GSM8K_DIR: {"classes_acc.json": {"Avg": 0.5}}})
    mmlu, gsm8k = classes(baseline, MMLU_DIR), classes(baseline, GSM8K_DIR)
    proc = accuracy(tmp_path / "run", data, "--baseline", str(copy))
    assert proc.returncode == 1 and "1 failed, 3 passed" in proc.stdout, proc.stdout[-3000:]
    assert "qwen-tiny-philosophy: accuracy" in proc.stdout and "is 0.2 below the baseline" in proc.stdout
    assert (f"FAILED {MMLU_DIR} Humanities: category accuracy {mmlu['Humanities']!r} is 0.2 below the baseline "
            f"{mmlu['Humanities'] + 0.2!r}; allowed drop 0 (--max-acc-drop)") in proc.stdout
    assert f"FAILED {GSM8K_DIR} Avg: category accuracy {gsm8k['Avg']!r} is 0.5 below the baseline" in proc.stdout
    assert f"STEM: category accuracy {mmlu['STEM']!r}, baseline {mmlu['STEM']!r}: passed" in proc.stdout
    allowed = accuracy(tmp_path / "run", data, "--baseline", str(copy), "--max-acc-drop", "0.5")  # resumed
    assert allowed.returncode == 0 and "4 passed" in allowed.stdout, allowed.stdout[-3000:]
    assert "FAILED" not in allowed.stdout


def all_right(baseline: Path, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A copy of the baseline whose every question was answered right (cache.csv, both accuracy files), and per
    subject how many the real run got wrong (each a right -> wrong flip against the copy)."""
    copy = tmp_path / "all-right"
    shutil.copytree(baseline, copy)
    wrong: dict[str, int] = {}
    for run_dir in (MMLU_DIR, GSM8K_DIR):
        cache = copy / run_dir / "cache.csv"
        rows = list(csv.reader(io.StringIO(cache.read_text(encoding="utf-8"))))
        for r in rows[1:]:
            wrong[r[0]] = wrong.get(r[0], 0) + (r[4] == "0")
            r[3], r[4] = r[2], "1"
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        cache.write_text(out.getvalue(), encoding="utf-8")
        for name in ("classes_acc.json", "subject_acc.json"):
            path = copy / run_dir / name
            path.write_text(json.dumps({k: 1.0 for k in json.loads(path.read_text())}))
        assert all(r.correct for r in read_cache(copy / run_dir))  # still a valid cache
    return copy, wrong


def test_mcnemar_fails_only_significant_drops_of_subjects_and_categories(baseline, data, tmp_path):
    copy, wrong = all_right(baseline, tmp_path)
    alpha = 0.005
    humanities = wrong["formal_logic"] + wrong["philosophy"]
    # Each subject's flips (8 questions at most) are within chance at this alpha; Humanities pools 16 questions.
    assert all(mcnemar_exact(n, 0) >= alpha for n in wrong.values()), wrong
    assert mcnemar_exact(humanities, 0) < alpha, f"the tiny model must get >= 10 of 16 Humanities wrong: {wrong}"
    proc = accuracy(tmp_path / "run", data, "--baseline", str(copy), "--acc-test", "mcnemar", "--alpha", str(alpha))
    assert proc.returncode == 1 and "4 passed" in proc.stdout, proc.stdout[-3000:]
    p = mcnemar_exact(humanities, 0)
    assert (f"FAILED {MMLU_DIR} Humanities: category accuracy" in proc.stdout
            and f"{humanities} question(s) right in the baseline and wrong now, 0 the reverse, of 16 paired: "
                f"McNemar's exact p = {p:.4g}, significant at --alpha {alpha:g}" in proc.stdout)
    n = wrong["gsm8k"]  # GSM8K's flips by exact match: within chance at this alpha, passed with the reason
    assert (f"of 8 paired: McNemar's exact p = {mcnemar_exact(n, 0):.4g}, not significant at --alpha {alpha:g}"
            in proc.stdout)
    assert f"FAILED {GSM8K_DIR}" not in proc.stdout  # (the drop limit alone would fail every case and category)


USER_TASK = """task: farm_exam
output_type: multiple_choice
dataset:
  layout: csv_header
  files: "{split}/{subject}.csv"
  columns: [Question, A, B, C, D, Answer]
  id_column: ""
  data_dir: data
test_split: test
fewshot_split: dev
num_fewshot: 2
subjects_file: subjects.csv
groups:
  Local: [agronomy]
question_column: Question
description: "以下是关于{name_zh}的单项选择题，请直接给出正确答案的选项。\\n\\n"
doc_to_text: "{Question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案："
strip: [Question]
doc_to_choice: [A, B, C, D]
doc_to_target: Answer
"""


def user_task(directory: Path, text: str = USER_TASK) -> Path:
    write_cmmlu(directory / "data", 4, subjects=["agronomy", "anatomy"])
    (directory / "subjects.csv").write_text("subject,name_zh,category\nagronomy,农学,Other\nanatomy,解剖学,STEM\n",
                                            encoding="utf-8")
    (directory / "task.yaml").write_text(text, encoding="utf-8")
    return directory / "task.yaml"


def test_a_users_task_file_runs_end_to_end_resumes_gates_and_compares(tmp_path, npuinfer_cache):
    task = user_task(tmp_path / "mine")
    cmd = ["-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu", "--model", "qwen-tiny",
           "--task", str(task)]
    first = run([*cmd, "--results-dir", str(tmp_path / "r")])
    assert first.returncode == 0 and "2 passed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "r" / "farm_exam_qwen-tiny_cpu"  # named after the file's task: name
    meta = json.loads((out / "cache_meta.json").read_text())
    assert meta["extra"]["task"] == "farm_exam" and meta["extra"]["task_file"] == str(task.resolve())
    assert sorted(json.loads((out / "classes_acc.json").read_text())) == [
        "Avg", "Avg (macro)", "Local", "Local (macro)", "Other", "Other (macro)", "STEM", "STEM (macro)"]
    assert len(read_cache(out)) == 8
    shutil.copytree(tmp_path / "r", tmp_path / "base")
    again = run([*cmd, "--results-dir", str(tmp_path / "r"), "--baseline", str(tmp_path / "base"), "-k", "farm_exam"])
    assert again.returncode == 0 and "2 passed" in again.stdout, again.stdout[-3000:]
    table = again.stdout[again.stdout.index("| subject"):again.stdout.index("Prompts over")]
    assert "| 0            | 2 " in table  # scored now 0 (resumed), 2 shots
    accs = json.loads((out / "classes_acc.json").read_text())
    for key in ("Other", "STEM", "Avg", "Local"):
        assert f"{key}: category accuracy {accs[key]!r}, baseline {accs[key]!r}: passed" in again.stdout
    compared = run(["-m", "npuinfer", "compare", str(tmp_path / "r"), str(tmp_path / "base"), "--out",
                    str(tmp_path / "cmp")])  # a fresh process: the task found through cache_meta.json
    assert compared.returncode == 0, compared.stderr
    assert "## Accuracy (farm_exam)" in compared.stdout
    assert "8 questions scored by both runs, 8 predicted alike" in compared.stdout
    # A baseline of another version of the file, made elsewhere (its path not here): not gated, saying why.
    meta_path = tmp_path / "base" / "farm_exam_qwen-tiny_cpu" / "cache_meta.json"
    base_meta = json.loads(meta_path.read_text())
    base_meta["extra"].update(task_file="/elsewhere/farm.yaml", task_sha256="0000")
    meta_path.write_text(json.dumps(base_meta))
    other = run([*cmd, "--results-dir", str(tmp_path / "r"), "--baseline", str(tmp_path / "base")])
    assert other.returncode == 0 and "2 passed" in other.stdout, other.stdout[-3000:] + other.stderr[-3000:]
    differ = f"task_sha256 '0000' (baseline) vs {meta['extra']['task_sha256']!r} (this run)"
    assert f"WARNING: categories not gated: the baseline was scored with other settings: {differ}" in other.stdout


def test_a_users_task_named_like_a_shipped_one_is_a_usage_error(tmp_path):
    task = user_task(tmp_path, USER_TASK.replace("task: farm_exam", "task: cmmlu"))
    proc = run(["-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu", "--task", str(task),
                "--results-dir", str(tmp_path / "r")])
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"--task {task}: {task.resolve()}: task: 'cmmlu' is the name of a shipped task" in proc.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    missing = run(["-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
                   "--task", str(tmp_path / "nope.yaml")])
    assert missing.returncode == 4 and f"--task {tmp_path / 'nope.yaml'}: no such task file" in missing.stderr


def test_a_stored_baseline_holds_every_tasks_folder_and_gates_them(baseline, data, tmp_path):
    """`npuinfer baseline update` stores each task's folder (not only C-Eval's) with its cache.csv, the manifest
    verifies, and a run gated against the stored baseline compares every task."""
    from npuinfer.gates.baseline_store import update_baseline, verify_baseline

    stored = tmp_path / "baselines" / "site"
    update_baseline(baseline, stored)
    for run_dir in (MMLU_DIR, GSM8K_DIR):
        assert sorted(p.name for p in (stored / run_dir).iterdir()) == [
            "cache.csv", "cache_meta.json", "classes_acc.json", "subject_acc.json"]
    assert verify_baseline(stored) == (8, [])
    proc = accuracy(tmp_path / "run", data, "--baseline", str(stored), "--acc-test", "mcnemar")
    assert proc.returncode == 0 and "4 passed" in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("Category gate against") == 2 and "not gated" not in proc.stdout.lower()
