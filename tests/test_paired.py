"""Two C-Eval runs compared question by question: the flips, agreement and McNemar's exact test, checked
against a hand computation, through `npuinfer compare`."""
from __future__ import annotations

from pathlib import Path

import pytest

from npuinfer.ceval.cache import CacheSettings, QuestionCache
from npuinfer.ceval.report import rebuild_report
from npuinfer.ceval.scored import ScoredRow
from npuinfer.cli import main
from npuinfer.reports.paired import mcnemar_exact, pair_runs


def run_dir(root: Path, name: str, predictions: dict[tuple[str, str], tuple[str, str]],
            logprobs: dict[tuple[str, str], tuple[float, ...]] | None = None) -> Path:
    """A C-Eval results directory whose cache holds (answer, prediction) per (subject, id), and where given, the
    choices' log-likelihoods."""
    out = root / name / "ceval_qwen-tiny_cpu"
    settings = CacheSettings(model="qwen-tiny", checkpoint="sha256:abc", template="lmeval", shots=5, dtype="float32",
                             split="val")
    with QuestionCache(out, settings) as cache:
        for (subject, qid), (answer, prediction) in predictions.items():
            cache.add(ScoredRow.make(subject, qid, answer, prediction, (logprobs or {}).get((subject, qid))))
    rebuild_report(out)
    return out


def test_mcnemar_exact_by_hand():
    # b = 1, c = 7: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18 / 256
    assert mcnemar_exact(1, 7) == pytest.approx(18 / 256)
    assert mcnemar_exact(7, 1) == mcnemar_exact(1, 7)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    # b = 0, c = 10: 2 / 1024
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_flips_and_agreement_per_subject(tmp_path):
    law = {("law", str(i)): ("A", "A") for i in range(8)}
    logic = {("logic", str(i)): ("B", "B") for i in range(10)}
    a = run_dir(tmp_path, "a", {**law, **logic})
    changed = dict(law)
    changed[("law", "0")] = ("A", "C")  # right -> wrong
    changed_logic = {k: (ans, "D") for k, (ans, _) in logic.items()}  # all ten: right -> wrong
    b = run_dir(tmp_path, "b", {**changed, **changed_logic})
    paired = pair_runs(a, b)
    by_name = {s.name: s for s in paired.subjects}
    assert (by_name["law"].questions, by_name["law"].agree, by_name["law"].right_to_wrong) == (8, 7, 1)
    assert by_name["logic"].right_to_wrong == 10 and by_name["logic"].p_value == pytest.approx(2 / 1024)
    assert paired.overall.right_to_wrong == 11 and paired.overall.wrong_to_right == 0
    assert paired.overall.p_value == pytest.approx(2 / 2 ** 11)
    assert [(f.subject, f.question_id, f.prediction_a, f.prediction_b) for f in paired.flips][:1] == \
        [("law", "0", "A", "C")]


def test_compare_prints_the_paired_table_and_the_flips(tmp_path, capsys):
    rows = {("law", str(i)): ("A", "A" if i % 2 else "B") for i in range(6)}
    a = run_dir(tmp_path, "float", rows)
    flipped = dict(rows)
    flipped[("law", "1")] = ("A", "B")  # right -> wrong
    flipped[("law", "0")] = ("A", "A")  # wrong -> right
    run_dir(tmp_path, "w8", flipped)
    assert main(["compare", str(tmp_path / "float"), str(tmp_path / "w8"), "--labels", "float,W8",
                 "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert "6 questions scored by both runs, 4 predicted alike; 1 right in float and wrong in W8, 1 the reverse" in text
    assert "McNemar's exact p = 1 (no difference beyond chance at 0.05)" in text
    assert "Questions that flipped (float -> W8)" in text
    assert a.is_dir()


def test_runs_of_other_data_are_refused_naming_the_question(tmp_path):
    a = run_dir(tmp_path, "a", {("law", "0"): ("A", "A")})
    b = run_dir(tmp_path, "b", {("law", "0"): ("B", "A")})
    with pytest.raises(ValueError, match="law question 0: answer 'A' in .* 'B' in .*not of the same data"):
        pair_runs(a, b)


def test_log_prob_drift_where_both_runs_hold_log_likelihoods(tmp_path):
    rows = {("law", str(i)): ("A", "A") for i in range(100)}
    base = {k: (-1.0, -2.0, -3.0, -4.0) for k in rows}
    a = run_dir(tmp_path, "a", rows, base)
    # question i moves choice A by i / 1000 and choice D by 0.5 on question 7 only
    moved = {("law", str(i)): (-1.0 - i / 1000, -2.0, -3.0, -4.5 if i == 7 else -4.0) for i in range(100)}
    b = run_dir(tmp_path, "b", rows, moved)
    text = (a / "cache.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "subject,question_id,answer,prediction,correct,logprobs"
    assert "law,3,A,A,1,-1.0;-2.0;-3.0;-4.0" in text
    drift = pair_runs(a, b).drift
    assert drift is not None and drift.questions == 100
    assert drift.max_each == pytest.approx(0.5) and drift.max_chosen == pytest.approx(0.099)
    # 400 differences: 396 below 0.1, then 0.097, 0.098, 0.099, 0.5; nearest rank 396 of 400 is 0.096 (choice A, q 96)
    assert drift.p99_each == pytest.approx(0.096) and drift.p99_chosen == pytest.approx(0.098)


def test_a_cache_without_the_logprobs_column_loads_and_its_drift_is_not_available(tmp_path, capsys):
    rows = {("law", str(i)): ("A", "B") for i in range(3)}
    a = run_dir(tmp_path, "a", rows, {k: (-1.0, -2.0, -3.0, -4.0) for k in rows})
    old = run_dir(tmp_path, "old", rows)  # no log-likelihoods: written as caches were before the column
    assert (old / "cache.csv").read_text(encoding="utf-8").splitlines()[0] == \
        "subject,question_id,answer,prediction,correct"
    paired = pair_runs(a, old)
    assert paired.drift is None and "run B holds no log-likelihoods" in paired.drift_missing
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "old"), "--out", str(tmp_path / "cmp")]) == 0
    assert "Log-prob drift: not available (run B holds no log-likelihoods" in capsys.readouterr().out


def test_an_old_cache_gains_the_logprobs_column_when_a_row_brings_log_likelihoods(tmp_path):
    out = run_dir(tmp_path, "a", {("law", "0"): ("A", "A")})
    settings = CacheSettings(model="qwen-tiny", checkpoint="sha256:abc", template="lmeval", shots=5, dtype="float32",
                             split="val")
    with QuestionCache(out, settings) as cache:
        assert cache.add(ScoredRow.make("law", "1", "B", "C", (-4.0, -3.0, -0.5, -9.0)))
        assert cache.add(ScoredRow.make("law", "2", "B", "B", (-4.0, -0.25, -3.0, -9.0)))
    assert (out / "cache.csv").read_text(encoding="utf-8") == (
        "subject,question_id,answer,prediction,correct,logprobs\n"
        "law,0,A,A,1,\nlaw,1,B,C,0,-4.0;-3.0;-0.5;-9.0\nlaw,2,B,B,1,-4.0;-0.25;-3.0;-9.0\n")


def test_a_w8a8_checkpoint_against_its_float_one_reports_its_flips(tmp_path):
    """qwen-tiny and its W8A8 copy (npuinfer quantize) through the accuracy suite on a few subjects of the shipped
    sample, then npuinfer compare: the questions whose correctness differs are the flips it lists (one on these
    subjects: middle_school_mathematics id 0), and both scored by log-likelihood, so the drift is reported."""
    import os
    import subprocess
    import sys

    from npuinfer.ceval.cache import read_cache

    repo = Path(__file__).resolve().parents[1]
    assert main(["quantize", "--model", "qwen-tiny", "--w8a8", "--out", str(tmp_path / "w8a8")]) == 0
    select = "middle_school_mathematics or law or logic"
    for name, model in (("float", ("--model", "qwen-tiny")), ("w8", ("--model-path", str(tmp_path / "w8a8")))):
        proc = subprocess.run([sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device",
                               "cpu", *model, "--results-dir", str(tmp_path / name), "-k", select], cwd=repo,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:]
    float_rows = {r.key: r for r in read_cache(next((tmp_path / "float").glob("ceval_*")))}
    w8_rows = {r.key: r for r in read_cache(next((tmp_path / "w8").glob("ceval_*")))}
    flipped = sorted(k for k in float_rows if float_rows[k].correct != w8_rows[k].correct)
    assert flipped, "no flip: the test needs a question W8A8 answers otherwise"
    assert main(["compare", str(tmp_path / "float"), str(tmp_path / "w8"), "--labels", "float,W8A8",
                 "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    table = text[text.index("Questions that flipped (float -> W8A8)"):]
    listed = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "subject" not in line]
    assert sorted((s.strip(), q.strip()) for s, q in listed) == flipped
    right_to_wrong = sum(float_rows[k].correct for k in flipped)
    assert f"{right_to_wrong} right in float and wrong in W8A8, {len(flipped) - right_to_wrong} the reverse" in text
    assert f"Log-prob drift over {len(float_rows)} questions" in text
