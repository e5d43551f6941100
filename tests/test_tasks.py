"""Tasks as data (npuinfer/tasks): the task file format and its errors, C-Eval's prompts read from its file, the
layouts of CMMLU, MMLU and GSM8K, lm-eval's answer filters, and each task scored, cached, resumed and reported."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.ceval.cache import CacheError, read_cache
from npuinfer.ceval.dataset import CevalDataError
from npuinfer.ceval.generation import context, draw_shots
from npuinfer.ceval.prompts import ATB, LMEVAL, task_templates
from npuinfer.ceval.report import rebuild_report
from npuinfer.ceval.run import CevalRun, RunSettings, results_dir
from npuinfer.ceval.taskdata import TaskData
from npuinfer.results.naming import ResultName
from npuinfer.tasks import TaskFileError, load_task, task_names
from npuinfer.tasks.extract import apply_filter, cut_at_stops, exact_match, reference
from npuinfer.tasks.synth import official_test_counts, write_cmmlu, write_gsm8k, write_mmlu

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_tasks_load_with_their_subject_tables():
    assert task_names() == ["ceval", "cmmlu", "gsm8k", "gsm8k_cot", "mmlu"]
    sizes = {t: len(load_task(t).subjects) for t in task_names()}
    assert sizes == {"ceval": 52, "cmmlu": 67, "gsm8k": 1, "gsm8k_cot": 1, "mmlu": 57}
    assert load_task("cmmlu").subject("agronomy").name_zh == "农学"
    assert load_task("mmlu").subject("abstract_algebra").category == "STEM"
    assert len(load_task("gsm8k_cot").fewshot_samples) == 8


def test_ceval_prompts_come_from_its_task_file_and_are_those_of_before():
    """The literal values prompts.py held before the task file: lm-eval's ceval-valid, and the Ascend tool's."""
    assert (LMEVAL.description, LMEVAL.block, LMEVAL.strip_question, LMEVAL.fit) == (
        "以下是中国关于{name_zh}的单项选择题，请选出其中的正确答案。\n\n",
        "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：", True, "truncate")
    assert (ATB.description, ATB.block, ATB.strip_question, ATB.fit) == (
        "The following are multiple choice questions (with answers) about {display_name}.\n\n",
        "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:", False, "shots")
    for t in (LMEVAL, ATB):
        assert (t.answer_delimiter, t.shot_delimiter, t.continuations) == (" ", "\n\n", (" A", " B", " C", " D"))


def test_mmlu_and_cmmlu_prompts_are_lm_evals():
    mmlu, cmmlu = task_templates("mmlu")["lmeval"], task_templates("cmmlu")["lmeval"]
    assert mmlu.render_description("abstract_algebra") == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert cmmlu.render_description("agronomy") == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    assert (mmlu.block, mmlu.strip_question) == ("{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:", True)
    assert (cmmlu.block, cmmlu.question_field) == ("{Question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：", "Question")


def write_task(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """task: t
output_type: multiple_choice
dataset: {layout: csv_noheader, files: "{split}/{subject}.csv", columns: [question, A, B, C, D, answer]}
test_split: test
doc_to_text: "{question}\\nA. {A}\\nAnswer:"
doc_to_choice: [A, B, C, D]
doc_to_target: answer
"""


@pytest.mark.parametrize("change, message", [
    (("output_type: multiple_choice", "output_type: ranking"),
     "output_type: expected one of multiple_choice, generate_until, got 'ranking'"),
    (('doc_to_text: "{question}', 'doc_to_text: "{question.__class__}'),
     "doc_to_text: field {question.__class__}: only plain names are allowed"),
    (('doc_to_text: "{question}', 'doc_to_text: "{questoin}'),
     "doc_to_text: field {questoin} is none of question, A, B, C, D, answer"),
    (("test_split: test\n", ""), "test_split: missing; expected a string"),
    (("layout: csv_noheader", "layout: parquet"), "dataset.layout: expected one of ceval_csv, csv_header"),
    (("task: t", "task: [t"), "not YAML"),
])
def test_a_bad_task_file_is_refused_naming_the_file_and_field(tmp_path, change, message):
    path = write_task(tmp_path, GOOD.replace(*change))
    with pytest.raises(TaskFileError) as caught:
        load_task(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_an_unknown_task_names_the_shipped_ones():
    with pytest.raises(TaskFileError, match="unknown task 'mmlu_pro'.*ceval, cmmlu, gsm8k, gsm8k_cot, mmlu"):
        load_task("mmlu_pro")


def test_the_layouts_read_as_their_official_files_are_written(tmp_path):
    write_cmmlu(tmp_path / "cmmlu", 3, subjects=["agronomy"])
    assert (tmp_path / "cmmlu/test/agronomy.csv").read_text(encoding="utf-8").startswith(",Question,A,B,C,D,Answer\n")
    cmmlu = TaskData("cmmlu", tmp_path / "cmmlu").questions("agronomy", "test")
    assert [q.question_id for q in cmmlu] == ["0", "1", "2"]
    write_mmlu(tmp_path / "mmlu", 2, subjects=["anatomy"])
    rows = list(csv.reader(open(tmp_path / "mmlu/test/anatomy_test.csv", encoding="utf-8", newline="")))
    mmlu = TaskData("mmlu", tmp_path / "mmlu").questions("anatomy", "test")
    assert [(q.question, *q.choices, q.answer) for q in mmlu] == [tuple(r) for r in rows]  # no header row lost
    write_gsm8k(tmp_path / "gsm8k", 3, 2)
    problems = TaskData("gsm8k", tmp_path / "gsm8k").problems("gsm8k", "test")
    assert len(problems) == 2 and "\n#### " in problems[0].answer


def test_official_counts_are_the_published_totals_and_are_written(tmp_path):
    mmlu, cmmlu = official_test_counts("mmlu"), official_test_counts("cmmlu")
    assert list(mmlu) == list(load_task("mmlu").subject_names) and sum(mmlu.values()) == 14042
    assert list(cmmlu) == list(load_task("cmmlu").subject_names) and sum(cmmlu.values()) == 11582
    write_cmmlu(tmp_path / "cmmlu", None, subjects=["chinese_foreign_policy"])
    assert len(TaskData("cmmlu", tmp_path / "cmmlu").questions("chinese_foreign_policy", "test")) == 107
    write_mmlu(tmp_path / "mmlu", None, subjects=["management"])
    assert len(TaskData("mmlu", tmp_path / "mmlu").questions("management", "test")) == 103


def test_bad_rows_name_the_file_and_line(tmp_path):
    write_mmlu(tmp_path, 2, subjects=["anatomy"])
    path = tmp_path / "test/anatomy_test.csv"
    path.write_text(path.read_text(encoding="utf-8") + "q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(CevalDataError, match=r"anatomy_test.csv: line \d+: answer 'E' for id '2' is not one of A, B"):
        TaskData("mmlu", tmp_path).questions("anatomy", "test")
    path.write_text("q,a,b,c\n", encoding="utf-8")
    with pytest.raises(CevalDataError, match=r"anatomy_test.csv: row 1 \(line 1\): 4 fields, expected 6"):
        TaskData("mmlu", tmp_path).questions("anatomy", "test")


def test_lm_evals_gsm8k_filters_and_exact_match():
    gsm8k, cot = load_task("gsm8k"), load_task("gsm8k_cot")
    strict, flexible = gsm8k.filters
    assert apply_filter(strict, "so 3 + 4 = 7\n#### 1,234\n\n") == "1,234"
    assert apply_filter(strict, "no answer here") == "[invalid]"
    assert apply_filter(flexible, "first 12 then $1,500.") == "$1,500."  # the last match, its non-empty group
    assert apply_filter(cot.filters[0], "So 5 + 4 = 9. The answer is 9.") == "9"
    assert reference(gsm8k, "Janet has 3.\n#### 1,234") == "1234"
    assert exact_match(gsm8k, "$1,234.", "1234") and not exact_match(gsm8k, "1234.5", "1234")
    assert cut_at_stops("7 apples\n\nQuestion: next", gsm8k.until) == "7 apples\n\n"


def test_gsm8k_shots_are_lm_evals_seeded_draw_per_question():
    spec = load_task("gsm8k")
    pool = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    rnd = random.Random(1234)
    assert draw_shots(spec, pool, 3, 5) == [rnd.sample(pool, 5) for _ in range(3)]
    text = context(spec, pool[:1], {"question": "How many?"})
    assert text == "Question: q0\nAnswer: a0\n\nQuestion: How many?\nAnswer:"


def test_result_directories_are_named_per_task():
    assert results_dir("r", "qwen-tiny", "cpu", "gsm8k_cot").name == "gsm8k_cot_qwen-tiny_cpu"
    assert ResultName.parse("gsm8k_cot_qwen-tiny_cpu") == ResultName("gsm8k_cot", "qwen-tiny", "cpu")
    assert ResultName.parse("mmlu_qwen-tiny_cpu") == ResultName("mmlu", "qwen-tiny", "cpu")
    assert results_dir("r", "m", "npu0").name == "ceval_m_npu0"


@pytest.fixture(scope="module")
def backend(npuinfer_cache):
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.runtime import load_model

    return NpuinferBackend(load_model("qwen-tiny", device="cpu", dtype="fp32"))


@pytest.mark.parametrize("task", ["mmlu", "cmmlu"])
def test_a_multiple_choice_task_scores_caches_resumes_and_reports(backend, task, tmp_path):
    spec = load_task(task)
    settings = RunSettings(spec.sample_dir(), task=task, shots=5)
    subjects = TaskData(spec, settings.data_dir).subjects(settings.split)[:3]
    run = CevalRun(backend, settings, tmp_path)
    first = [run.run_subject(s) for s in subjects]
    again = [run.run_subject(s) for s in subjects]
    run.close()
    assert [r.scored_now for r in first] == [2, 2, 2] and [r.scored_now for r in again] == [0, 0, 0]
    assert [r.rows for r in first] == [r.rows for r in again]
    meta = json.loads((tmp_path / "cache_meta.json").read_text())
    assert meta["extra"]["task"] == task and meta["split"] == "test"
    names = [p.name for p in rebuild_report(tmp_path)]
    assert names == ["subject_acc.json", "classes_acc.json", "summary.md", f"{task}_acc.png"]
    accs = json.loads((tmp_path / "subject_acc.json").read_text())
    assert list(accs) == subjects and accs[subjects[0]] == first[0].accuracy
    assert f"# {task} results" in (tmp_path / "summary.md").read_text()
    with pytest.raises(CacheError, match="the cache was written with other settings.*extra.task"):
        CevalRun(backend, RunSettings(load_task("mmlu" if task == "cmmlu" else "cmmlu").sample_dir(),
                                      task="mmlu" if task == "cmmlu" else "cmmlu"), tmp_path)


def test_gsm8k_generates_until_the_stop_strings_and_keeps_the_text(backend, tmp_path):
    settings = RunSettings(load_task("gsm8k_cot").sample_dir(), task="gsm8k_cot", shots=8, batch_size=2,
                           max_gen_toks=24)
    run = CevalRun(backend, settings, tmp_path)
    result = run.run_subject("gsm8k_cot")
    run.close()
    assert result.scored_now == 4
    rows = read_cache(tmp_path)
    assert {r.question_id: r.generated for r in rows} == {r.question_id: r.generated for r in result.rows}
    assert json.loads((tmp_path / "cache_meta.json").read_text())["extra"]["max_new_tokens"] == 24
    for row in rows:
        assert row.generated and not any(stop in row.generated for stop in load_task("gsm8k_cot").until)
        assert row.prediction == apply_filter(load_task("gsm8k_cot").filters[0], row.generated)
        assert row.correct == (row.prediction == row.answer)
    header = (tmp_path / "cache.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "subject,question_id,answer,prediction,correct,generated"
    run = CevalRun(backend, settings, tmp_path)
    assert run.run_subject("gsm8k_cot").scored_now == 0  # resumed from the cache
    run.close()


def test_any_generated_text_round_trips_through_the_cache(tmp_path):
    """A tiny model generates carriage returns, NULs and quotes: the text column is a JSON string, one line a row."""
    from dataclasses import replace

    from npuinfer.ceval.cache import CacheSettings, QuestionCache, merge_parts
    from npuinfer.ceval.scored import ScoredRow

    settings = CacheSettings("m", "c", "lmeval", 8, "fp32", "test", extra={"task": "gsm8k_cot"})
    texts = ["a\rb\r\nc\n", 'say "7"\x00,', "", "以下 #### 5"]
    rows = [ScoredRow("gsm8k_cot", str(i), "5", "5", True, generated=t) for i, t in enumerate(texts)]
    with QuestionCache(tmp_path, settings) as cache:
        for row in rows:
            cache.add(row)
        assert cache.add(replace(rows[0])) is False  # the same row again: read back equal
    merge_parts(tmp_path)
    assert read_cache(tmp_path) == rows
    assert (tmp_path / "cache.csv").read_bytes().count(b"\n") == len(rows) + 1


def test_pytest_accuracy_runs_tasks_side_by_side(tmp_path):
    """--task repeats; test_task[<task>-<model>-<subject>] ids work with -k; each task has its own directory."""
    cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
           "--results-dir", str(tmp_path), "--task", "mmlu", "--task", "cmmlu", "--task", "ceval", "-k", "anatomy"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout  # mmlu and cmmlu have an anatomy subject, C-Eval none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmmlu_qwen-tiny_cpu", "mmlu_qwen-tiny_cpu"]
    bad = subprocess.run(cmd[:-4] + ["--task", "mmlu_pro"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--task mmlu_pro: no such task; shipped: ceval, cmmlu" in bad.stderr


@pytest.mark.e2e
def test_gsm8k_through_transformers_generates_what_npuinfer_generates(tmp_path):
    """(e2e: two suite runs, a minute or two.) --backend hf (transformers' generate on the same weights, cut at the stop strings): the same texts and
    answers as npuinfer's in-process batched greedy decoding."""
    texts = {}
    for backend in ("npuinfer", "hf"):
        cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
               "--results-dir", str(tmp_path / backend), "--task", "gsm8k_cot", "--max-gen-toks", "16",
               "--backend", backend]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (run,) = (tmp_path / backend).glob("gsm8k_cot_*")
        texts[backend] = {(r.question_id, r.generated, r.prediction) for r in read_cache(run)}
    assert len(texts["npuinfer"]) == 4 and texts["hf"] == texts["npuinfer"]


def test_a_task_is_gated_per_subject_against_its_own_baseline(tmp_path):
    """--baseline: a directory of runs holding <task>_<model>_<device>/; a subject below it fails its case."""
    cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
           "--task", "mmlu", "-k", "anatomy"]
    first = subprocess.run(cmd + ["--results-dir", str(tmp_path / "base")], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    accs = tmp_path / "base" / "mmlu_qwen-tiny_cpu" / "subject_acc.json"
    accs.write_text(json.dumps({"anatomy": 1.0}), encoding="utf-8")  # a baseline the tiny model cannot reach
    gated = subprocess.run(cmd + ["--results-dir", str(tmp_path / "run"), "--baseline", str(tmp_path / "base")],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert gated.returncode == 1, gated.stdout[-3000:] + gated.stderr[-3000:]
    assert "qwen-tiny-anatomy: accuracy" in gated.stdout and "below the baseline 1.0" in gated.stdout
