"""Every task's finished runs read back: `npuinfer compare` and the question-by-question comparison for MMLU and
GSM8K runs (real caches and reports, written through the suite's own cache and report code), the category gate
over a task's own groups, and a user's task file read by path with its name checked. No model runs here."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from npuinfer.ceval.aggregate import grouping
from npuinfer.ceval.cache import CacheSettings, QuestionCache
from npuinfer.ceval.report import rebuild_report
from npuinfer.ceval.run import read_results_dir
from npuinfer.ceval.scored import ScoredRow
from npuinfer.cli import main
from npuinfer.gates.accuracy import gate_categories
from npuinfer.reports.compare import compare_runs, parse_labels
from npuinfer.reports.paired import mcnemar_exact, pair_runs
from npuinfer.tasks import TaskFileError, load_task

HUMANITIES = ("formal_logic", "philosophy")  # MMLU's Humanities
STEM = ("anatomy",)


def task_run(root: Path, task: str, rows: list[ScoredRow], model: str = "qwen-tiny") -> Path:
    """A results directory of ``task`` holding ``rows``, its report rebuilt as the suite rebuilds it."""
    out = root / f"{task}_{model}_cpu"
    settings = CacheSettings(model=model, checkpoint="sha256:abc", template="lmeval", shots=5, dtype="float32",
                             split="test", extra={"task": task})
    with QuestionCache(out, settings) as cache:
        for row in rows:
            cache.add(row)
    rebuild_report(out)
    return out


def mc(subject: str, qid: int, answer: str, prediction: str) -> ScoredRow:
    return ScoredRow.make(subject, str(qid), answer, prediction, (-1.0, -2.0, -3.0, -4.0))


def gen(qid: int, answer: str, prediction: str) -> ScoredRow:
    return ScoredRow("gsm8k", str(qid), answer, prediction, prediction == answer,
                     generated=f"so it is {prediction}\n\n")


def mmlu_rows(right: dict[str, int], per_subject: int = 4) -> list[ScoredRow]:
    """per_subject questions of each subject in ``right`` (answer A), the first right[subject] predicted right."""
    return [mc(s, i, "A", "A" if i < n else "B") for s, n in right.items() for i in range(per_subject)]


def test_compare_reads_mmlu_runs_pools_its_categories_and_pairs_the_questions(tmp_path, capsys):
    a = task_run(tmp_path / "a", "mmlu", mmlu_rows({"formal_logic": 4, "philosophy": 3, "anatomy": 1}))
    b = task_run(tmp_path / "b", "mmlu", mmlu_rows({"formal_logic": 1, "philosophy": 2, "anatomy": 1}))
    assert read_results_dir(a).task == "mmlu" and read_results_dir(a).model == "qwen-tiny"
    assert main(["compare", str(a.parent), str(b.parent), "--labels", "fp32,w8", "--out", str(tmp_path / "cmp")]) == 0
    with open(tmp_path / "cmp" / "accuracy.csv", encoding="utf-8", newline="") as f:
        table = {(r["task"], r["group"], r["name"]): r for r in csv.DictReader(f)}
    hum = table[("mmlu", "category", "Humanities")]  # pooled: (4 + 3) / 8 against (1 + 2) / 8
    assert float(hum["fp32"]) == pytest.approx(7 / 8) and float(hum["w8"]) == pytest.approx(3 / 8)
    assert float(table[("mmlu", "category", "STEM")]["fp32-w8"]) == pytest.approx(0.0)
    assert float(table[("mmlu", "category", "Avg")]["fp32"]) == pytest.approx(8 / 12)
    assert float(table[("mmlu", "subject", "philosophy")]["w8"]) == pytest.approx(0.5)
    md = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert "## Accuracy (mmlu)" in md and "## qwen-tiny mmlu: question by question" in md
    # formal_logic 3 right -> wrong, philosophy 1: four flips one way, none the other.
    assert (f"12 questions scored by both runs, 8 predicted alike; 4 right in fp32 and wrong in w8, 0 the reverse; "
            f"McNemar's exact p = {mcnemar_exact(4, 0):.4g}") in md
    assert "Log-prob drift over 12 questions" in md


def test_gsm8k_runs_pair_by_exact_match_and_say_why_there_is_no_drift(tmp_path):
    a = task_run(tmp_path / "a", "gsm8k", [gen(i, str(i), str(i)) for i in range(6)])  # all right
    b = task_run(tmp_path / "b", "gsm8k", [gen(i, str(i), str(i) if i < 2 else "[invalid]") for i in range(6)])
    paired = pair_runs(a, b)
    assert (paired.overall.questions, paired.overall.right_to_wrong, paired.overall.wrong_to_right) == (6, 4, 0)
    assert paired.overall.p_value == pytest.approx(mcnemar_exact(4, 0))
    assert [(f.question_id, f.prediction_a, f.prediction_b) for f in paired.flips][0] == ("2", "2", "[invalid]")
    assert paired.drift is None and "holds no log-likelihoods (scored by generation" in paired.drift_missing
    comparison = compare_runs(a.parent, b.parent, parse_labels("A,B", a.parent, b.parent))
    assert list(comparison.paired) == [("gsm8k", "qwen-tiny")]
    avg = next(r for r in comparison.accuracy if r["group"] == "category" and r["name"] == "Avg")
    assert (avg["A"], avg["B"]) == (1.0, pytest.approx(2 / 6))


def test_runs_of_different_tasks_are_never_paired(tmp_path):
    mmlu = task_run(tmp_path / "a", "mmlu", mmlu_rows({"anatomy": 2}))
    cmmlu = task_run(tmp_path / "b", "cmmlu", mmlu_rows({"anatomy": 2}))  # the same subject name and ids
    with pytest.raises(ValueError, match="holds task 'mmlu' and .* task 'cmmlu': runs of different tasks are never"):
        pair_runs(mmlu, cmmlu)
    comparison = compare_runs(mmlu.parent, cmmlu.parent, parse_labels("A,B", mmlu.parent, cmmlu.parent))
    assert comparison.paired == {}
    assert ("A holds mmlu and B cmmlu: no task in both; results of different tasks are never compared or paired "
            "question by question") in comparison.notes
    assert {r["note"] for r in comparison.accuracy} == {"only in A", "only in B"}


def test_the_category_gate_pools_a_tasks_own_groups():
    g = grouping(load_task("mmlu"))
    run_s = {"formal_logic": 0.25, "philosophy": 0.25, "anatomy": 0.5}
    run_c = {"Humanities": 0.25, "STEM": 0.5, "Avg": 1 / 3}
    base_c = {"Humanities": 0.5, "STEM": 0.5, "Avg": 0.5}
    verdicts = {v.category: v for v in gate_categories(run_s, run_c, dict(run_s), base_c, 0.1, grouping=g)}
    assert sorted(verdicts) == ["Avg", "Humanities", "STEM"]
    assert verdicts["Humanities"].status == "failed" and verdicts["STEM"].status == "passed"
    assert verdicts["Avg"].status == "failed"
    assert g.keys_of("formal_logic") == ("Humanities", "Avg")
    assert "China specific" in grouping(load_task("cmmlu")).keys_of("chinese_history")
    gsm8k = grouping(load_task("gsm8k"))  # a task without subjects: its one subject, overall
    assert gsm8k.keys_of("gsm8k") == ("All", "Avg")


USER_TASK = """task: {name}
output_type: multiple_choice
dataset:
  layout: csv_header
  files: "{{split}}/{{subject}}.csv"
  columns: [Question, A, B, C, D, Answer]
  id_column: ""
  data_dir: data
test_split: test
fewshot_split: dev
num_fewshot: 1
subjects_file: subjects.csv
groups:
  Local: [agronomy]
question_column: Question
description: "以下是关于{{name_zh}}的单项选择题。\\n\\n"
doc_to_text: "{{Question}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n答案："
doc_to_choice: [A, B, C, D]
doc_to_target: Answer
"""


def user_task(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "subjects.csv").write_text("subject,name_zh,category\nagronomy,农学,Other\nanatomy,解剖学,STEM\n",
                                            encoding="utf-8")
    path = directory / f"{name}.yaml"
    path.write_text(USER_TASK.format(name=name), encoding="utf-8")
    return path


def test_a_users_task_file_reads_its_paths_beside_it_and_is_known_by_its_name(tmp_path):
    path = user_task(tmp_path / "mine", "farm_exam_a")
    spec = load_task(path)
    assert not spec.shipped and spec.sample_dir() == (tmp_path / "mine" / "data").resolve()
    assert spec.subject_names == ("agronomy", "anatomy") and spec.categories == ("Other", "STEM")
    assert load_task("farm_exam_a") is spec  # by name from now on
    assert load_task("mmlu").shipped


def test_a_users_task_named_like_a_shipped_one_is_refused(tmp_path):
    path = user_task(tmp_path, "cmmlu")
    with pytest.raises(TaskFileError) as caught:
        load_task(path)
    assert str(caught.value).startswith(f"{path.resolve()}: task: 'cmmlu' is the name of a shipped task")
    assert "needs a name of its own" in str(caught.value)
    assert load_task("cmmlu").shipped  # the shipped task is untouched


def test_two_task_files_with_one_name_are_refused(tmp_path):
    first = load_task(user_task(tmp_path / "one", "farm_exam_b"))
    second = user_task(tmp_path / "two", "farm_exam_b")
    with pytest.raises(TaskFileError, match=f"task: 'farm_exam_b' is already the name of {first.path}"):
        load_task(second)


def test_sample_and_data_dir_together_are_refused_naming_the_field(tmp_path):
    path = user_task(tmp_path, "farm_exam_c")
    path.write_text(path.read_text(encoding="utf-8").replace("  data_dir: data\n", "  data_dir: data\n  sample: x\n"),
                    encoding="utf-8")
    with pytest.raises(TaskFileError, match=r"dataset\.data_dir: give dataset\.sample or dataset\.data_dir"):
        load_task(path)


def test_meta_of_a_users_task_resolves_it_in_a_fresh_reader(tmp_path):
    """A cache_meta.json naming a user's task file: read_results_dir (compare's reader) finds the task by it."""
    path = user_task(tmp_path / "t", "farm_exam_d")
    out = tmp_path / "farm_exam_d_qwen-tiny_cpu"
    out.mkdir()
    meta = {"format_version": 1, "model": "qwen-tiny", "checkpoint": "c", "template": "lmeval", "shots": 1,
            "dtype": "fp32", "split": "test", "extra": {"task": "farm_exam_d", "task_file": str(path.resolve())}}
    (out / "cache_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    named = read_results_dir(out)
    assert (named.task, named.model, named.device) == ("farm_exam_d", "qwen-tiny", "cpu")
