"""C-Eval results: aggregation, cache, part-file merge, report. Real files in tmp_path."""

from __future__ import annotations

import json
import random

import pytest

from npuinfer.ceval.aggregate import aggregate, classes_accuracy, subject_accuracy
from npuinfer.ceval.cache import (
    CacheError,
    CacheWarning,
    CacheSettings,
    QuestionCache,
    merge_parts,
    read_cache,
)
from npuinfer.ceval.report import rebuild_report, write_report
from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.subjects import SUBJECTS

HEADER = "subject,question_id,answer,prediction,correct\n"
SETTINGS = CacheSettings(model="qwen-7b", checkpoint="sha256:abc", template="lmeval", shots=5,
                         dtype="float16", split="val", extra={"max_tokens": 2000})


def row(subject: str, qid: str, answer: str | None, prediction: str) -> ScoredRow:
    return ScoredRow.make(subject, qid, answer, prediction)


# computer_network 1/1, advanced_mathematics 1/3 (hard), college_physics 0/2 (hard): STEM;
# logic 1/2: Humanities. No Social Science, no Other.
TABLE = [
    row("computer_network", "0", "A", "A"),
    row("advanced_mathematics", "0", "B", "B"),
    row("advanced_mathematics", "1", "C", "A"),
    row("advanced_mathematics", "2", "D", "A"),
    row("college_physics", "0", "A", "B"),
    row("college_physics", "1", "A", "C"),
    row("logic", "0", "B", "B"),
    row("logic", "1", "C", "D"),
]


# ---- aggregation ------------------------------------------------------------------------------

def test_category_accuracy_pools_questions():
    classes = classes_accuracy(TABLE)
    # Hand computation: STEM = (1 + 1 + 0) / (1 + 3 + 2); the mean of its subjects, 4/9, is its macro average.
    pooled = {"STEM": 2 / 6, "Humanities": 1 / 2, "Avg": 3 / 8, "Avg(Hard)": 1 / 5}
    macro = {"STEM (macro)": (1 + 1 / 3 + 0) / 3, "Humanities (macro)": 1 / 2,
             "Avg (macro)": (1 + 1 / 3 + 0 + 1 / 2) / 4, "Avg(Hard) (macro)": (1 / 3 + 0) / 2}
    assert classes == {**pooled, **macro}
    assert list(classes) == [*pooled, *macro]  # the pooled keys first, as classes_acc.json always had them
    assert classes["STEM"] != classes["STEM (macro)"]
    assert subject_accuracy(TABLE) == {
        "computer_network": 1.0, "college_physics": 0.0, "advanced_mathematics": 1 / 3,
        "logic": 0.5,
    }
    assert list(subject_accuracy(reversed(TABLE))) == [
        "computer_network", "college_physics", "advanced_mathematics", "logic"]
    tallies = aggregate(TABLE).classes
    assert (tallies["Avg"].correct, tallies["Avg"].total) == (3, 8)


def test_aggregation_refuses_rows_without_answer():
    with pytest.raises(ValueError, match="no answer"):
        aggregate([row("logic", "0", None, "A")])
    with pytest.raises(KeyError, match="unknown C-Eval subject"):
        aggregate([row("astrology", "0", "A", "A")])


# ---- cache ------------------------------------------------------------------------------------

def test_cache_appends_flushes_and_resumes(tmp_path):
    cache = QuestionCache(tmp_path, SETTINGS)
    for r in TABLE[:3]:
        cache.add(r)
    # Flushed as each question is scored: visible on disk while the cache is still open.
    text = (tmp_path / "cache.csv").read_text(encoding="utf-8")
    assert text == HEADER + "computer_network,0,A,A,1\nadvanced_mathematics,0,B,B,1\n" \
                            "advanced_mathematics,1,C,A,0\n"
    cache.close()
    meta = json.loads((tmp_path / "cache_meta.json").read_text())
    assert meta["format_version"] == 1 and meta["dtype"] == "float16" and meta["shots"] == 5

    with QuestionCache(tmp_path, SETTINGS) as resumed:
        assert resumed.scored_ids() == {r.key for r in TABLE[:3]}
        assert not resumed.add(TABLE[0])  # the same row again: nothing written
        with pytest.raises(CacheError, match="already scored"):
            resumed.add(row("computer_network", "0", "A", "B"))
        for r in TABLE[3:]:
            resumed.add(r)
    assert read_cache(tmp_path) == TABLE


def test_cache_keeps_test_split_rows(tmp_path):
    settings = CacheSettings("m", "c", "lmeval", 5, "float16", "test")
    with QuestionCache(tmp_path, settings) as cache:
        cache.add(row("logic", "0", None, "C"))
    assert (tmp_path / "cache.csv").read_text() == HEADER + "logic,0,,C,\n"
    assert read_cache(tmp_path) == [ScoredRow("logic", "0", None, "C", None)]


@pytest.mark.parametrize("change, fragments", [
    ({"dtype": "bfloat16"}, ["dtype: 'float16' in the cache, 'bfloat16' now"]),
    ({"shots": 0, "template": "atb"}, ["template: 'lmeval' in the cache, 'atb' now",
                                      "shots: 5 in the cache, 0 now"]),
    ({"extra": {"max_tokens": 1024}}, ["extra.max_tokens: 2000 in the cache, 1024 now"]),
    ({"checkpoint": "sha256:def"}, ["checkpoint: 'sha256:abc' in the cache, 'sha256:def' now"]),
])
def test_cache_refuses_other_settings(tmp_path, change, fragments):
    with QuestionCache(tmp_path, SETTINGS) as cache:
        cache.add(TABLE[0])
    before = (tmp_path / "cache.csv").read_bytes()
    other = CacheSettings(**{**SETTINGS.__dict__, **change})
    with pytest.raises(CacheError) as err:
        QuestionCache(tmp_path, other)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert (tmp_path / "cache.csv").read_bytes() == before


@pytest.mark.parametrize("version, fragment", [
    (0, "older cache format (version 0)"),
    (None, "unknown cache format"),
    (2, "unknown cache format (format_version 2)"),
])
def test_cache_refuses_other_formats(tmp_path, version, fragment):
    QuestionCache(tmp_path, SETTINGS).close()
    meta = json.loads((tmp_path / "cache_meta.json").read_text())
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    (tmp_path / "cache_meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="cache_meta.json") as err:
        QuestionCache(tmp_path, SETTINGS)
    assert fragment in str(err.value)
    with pytest.raises(CacheError, match="format"):
        read_cache(tmp_path)


def test_cache_rows_without_meta_are_refused(tmp_path):
    (tmp_path / "cache.csv").write_text(HEADER + "logic,0,A,A,1\n")
    with pytest.raises(CacheError, match="without cache_meta.json"):
        QuestionCache(tmp_path, SETTINGS)


def test_cache_recovers_from_a_cut_last_row(tmp_path):
    QuestionCache(tmp_path, SETTINGS).close()
    (tmp_path / "cache.csv").write_text(HEADER + "logic,0,A,A,1\nlogic,1,B,")
    with QuestionCache(tmp_path, SETTINGS) as cache:
        assert cache.scored_ids() == {("logic", "0")}
        cache.add(row("logic", "1", "B", "B"))
    assert (tmp_path / "cache.csv").read_text() == HEADER + "logic,0,A,A,1\nlogic,1,B,B,1\n"
    # A complete last row that merely lacks its newline is kept.
    (tmp_path / "cache.csv").write_text(HEADER + "logic,0,A,A,1")
    with QuestionCache(tmp_path, SETTINGS) as cache:
        cache.add(row("logic", "1", "B", "C"))
    assert (tmp_path / "cache.csv").read_text() == HEADER + "logic,0,A,A,1\nlogic,1,B,C,0\n"


def test_cache_rejects_corrupt_rows(tmp_path):
    QuestionCache(tmp_path, SETTINGS).close()
    path = tmp_path / "cache.csv"
    path.write_text(HEADER + "logic,0,A,A,1\nlogic,1,B,C,1\n")
    with pytest.raises(CacheError) as err:
        read_cache(tmp_path)
    assert str(path) in str(err.value) and "row 2" in str(err.value)
    path.write_text("subject,id,answer,prediction,correct\n")
    with pytest.raises(CacheError, match="row 0 \\(header\\)"):
        read_cache(tmp_path)


# ---- part files left by an older npuinfer, two writers at once -------------------------------

def test_leftover_part_files_merge_and_sort(tmp_path):
    with QuestionCache(tmp_path, SETTINGS) as cache:  # records the settings first
        cache.add(row("logic", "5", "A", "A"))
    (tmp_path / "cache.part-gw0.csv").write_text(HEADER + "logic,10,A,A,1\ncomputer_network,3,D,D,1\n")
    (tmp_path / "cache.part-gw1.csv").write_text(HEADER + "logic,2,B,C,0\ncomputer_network,3,D,D,1\n")
    with pytest.warns(CacheWarning, match="1 identical duplicate"):
        merged = merge_parts(tmp_path)
    assert merged == tmp_path / "cache.csv"
    assert merged.read_text() == (HEADER + "computer_network,3,D,D,1\n"
                                  "logic,2,B,C,0\nlogic,5,A,A,1\nlogic,10,A,A,1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache.csv", "cache_meta.json"]
    before = merged.read_bytes()
    merge_parts(tmp_path)
    assert merged.read_bytes() == before


def test_two_writers_and_a_merge_in_between_keep_every_row_once(tmp_path):
    a, b = QuestionCache(tmp_path, SETTINGS), QuestionCache(tmp_path, SETTINGS)
    assert a.add(row("logic", "1", "A", "A"))
    assert not b.add(row("logic", "1", "A", "A"))  # scored by the other writer meanwhile: not written twice
    assert b.add(row("logic", "0", "B", "B"))
    merge_parts(tmp_path)  # replaces cache.csv while both still hold it open
    assert a.add(row("law", "0", "C", "D"))
    assert not b.add(row("law", "0", "C", "D"))
    assert b.add(row("law", "1", "C", "C"))
    a.close()
    b.close()
    # the merge sorted the first two rows; then appends in order
    assert (tmp_path / "cache.csv").read_text() == (HEADER + "logic,0,B,B,1\nlogic,1,A,A,1\nlaw,0,C,D,0\n"
                                                   "law,1,C,C,1\n")


# ---- report -----------------------------------------------------------------------------------

def test_report_files(tmp_path):
    paths = write_report(tmp_path, TABLE, settings=SETTINGS)
    assert [p.name for p in paths] == ["subject_acc.json", "classes_acc.json", "summary.md",
                                       "ceval_acc.png"]
    assert json.loads((tmp_path / "classes_acc.json").read_text()) == {
        "STEM": 2 / 6, "Humanities": 0.5, "Avg": 0.375, "Avg(Hard)": 0.2, "STEM (macro)": 4 / 9,
        "Humanities (macro)": 0.5, "Avg (macro)": 11 / 24, "Avg(Hard) (macro)": 1 / 6}
    assert json.loads((tmp_path / "subject_acc.json").read_text())["advanced_mathematics"] == 1 / 3
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| advanced_mathematics " in summary and "高等数学" in summary
    assert "| 0.3333 " in summary and repr(1 / 3) not in summary  # 4 decimals (the JSON keeps full precision)
    assert summary.index("## Per subject") < summary.index("## Per category")
    assert "macro average" in summary and f"| {11 / 24:.4f} " in summary  # the macro Avg, labelled
    assert "- dtype: float16" in summary.splitlines()
    assert (tmp_path / "ceval_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_all_class_keys_when_all_categories_present(tmp_path):
    rows = [row(s.name, "0", "A", "A" if i % 2 else "B") for i, s in enumerate(SUBJECTS)]
    write_report(tmp_path, rows)
    classes = json.loads((tmp_path / "classes_acc.json").read_text())
    pooled = ["STEM", "Social Science", "Humanities", "Other", "Avg", "Avg(Hard)"]
    assert list(classes) == pooled + [f"{k} (macro)" for k in pooled]
    assert classes["Avg"] == 26 / 52


def test_rebuild_report_equals_write_report(tmp_path):
    run = tmp_path / "run"
    rows = [row(s.name, str(i), "ABCD"[i % 4], "ABCD"[(i * s.val_questions) % 4])
            for s in SUBJECTS for i in range(3)]
    random.Random(0).shuffle(rows)
    first, second = QuestionCache(run, SETTINGS), QuestionCache(run, SETTINGS)
    for n, r in enumerate(rows):
        (first if n % 2 else second).add(r)
    first.close()
    second.close()
    direct = write_report(tmp_path / "direct", rows, settings=SETTINGS)
    rebuilt = rebuild_report(run)
    assert [p.name for p in rebuilt] == [p.name for p in direct]
    for a, b in zip(direct, rebuilt):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert not list(run.glob("cache.part-*"))


def test_test_split_report_claims_no_accuracy(tmp_path):
    settings = CacheSettings("m", "c", "lmeval", 5, "float16", "test")
    with QuestionCache(tmp_path, settings) as cache:
        for r in (row("logic", "1", None, "B"), row("logic", "0", None, "A"),
                  row("law", "0", None, "")):
            cache.add(r)
    paths = rebuild_report(tmp_path)
    assert [p.name for p in paths] == ["subject_acc.json", "classes_acc.json", "summary.md",
                                       "ceval_acc.png", "submission.json"]
    for name in ("subject_acc.json", "classes_acc.json"):
        data = json.loads((tmp_path / name).read_text())
        assert data["accuracy"] is None and "no accuracy" in data["note"]
    assert json.loads((tmp_path / "subject_acc.json").read_text())["predictions"] == {
        "logic": 2, "law": 1}
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "No accuracy" in summary and "0.0" not in summary and "%" not in summary
    assert json.loads((tmp_path / "submission.json").read_text()) == {
        "logic": {"0": "A", "1": "B"}, "law": {"0": ""}}


def test_report_refuses_mixed_or_duplicate_rows(tmp_path):
    with pytest.raises(ValueError, match="cannot mix"):
        write_report(tmp_path, [TABLE[0], row("logic", "9", None, "A")])
    with pytest.raises(ValueError, match="more than once"):
        write_report(tmp_path, [TABLE[0], TABLE[0]])
    with pytest.raises(ValueError, match="no scored rows"):
        write_report(tmp_path, [])


# ---- a tampered cache.csv -------------------------------------------------------------------

@pytest.mark.parametrize("line, fragment", [
    ("logic,1,A,Z,0", "row 2: prediction 'Z' is not one of A, B, C, D"),
    ("no_such_subject,0,A,A,1", "row 2: unknown C-Eval subject 'no_such_subject'"),
])
def test_tampered_rows_are_refused_naming_file_and_row(tmp_path, line, fragment):
    from npuinfer.cli import main

    QuestionCache(tmp_path, SETTINGS).close()
    path = tmp_path / "cache.csv"
    path.write_text(HEADER + "logic,0,A,A,1\n" + line + "\n")
    before = path.read_bytes()
    with pytest.raises(CacheError) as err:
        read_cache(tmp_path)
    assert f"{path}: {fragment}" in str(err.value)
    assert main(["report", "ceval", str(tmp_path)]) == 1
    assert path.read_bytes() == before and not (tmp_path / "subject_acc.json").exists()


def test_conflicting_duplicates_are_an_error_and_report_writes_nothing(tmp_path, capsys):
    from npuinfer.cli import main

    QuestionCache(tmp_path, SETTINGS).close()
    path = tmp_path / "cache.csv"
    # the genuine row first, a forged second row for the same question later
    path.write_text(HEADER + "logic,0,A,B,0\nlogic,1,C,C,1\nlaw,0,D,D,1\nlogic,0,A,A,1\n")
    before = path.read_bytes()
    assert main(["report", "ceval", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"logic id 0: {path} row 1 (prediction 'B'); {path} row 4 (prediction 'A')" in err
    assert path.read_bytes() == before  # no row removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache.csv", "cache_meta.json"]
    with pytest.raises(CacheError, match="conflicting"):
        QuestionCache(tmp_path, SETTINGS)  # a run does not add to it either
    assert path.read_bytes() == before


def test_identical_duplicates_collapse_with_a_warning(tmp_path):
    QuestionCache(tmp_path, SETTINGS).close()
    path = tmp_path / "cache.csv"
    path.write_text(HEADER + "logic,1,C,C,1\nlogic,0,A,B,0\nlogic,1,C,C,1\n")
    with pytest.warns(CacheWarning, match=rf"1 identical duplicate row\(s\) collapse into one \({path} row 3\)"):
        rebuild_report(tmp_path)
    assert path.read_text() == HEADER + "logic,0,A,B,0\nlogic,1,C,C,1\n"
    assert json.loads((tmp_path / "subject_acc.json").read_text()) == {"logic": 0.5}


# ---- prompt fitting: a setting with an implied legacy value, and a run record -------------------------------

def test_a_cache_written_before_fit_existed_is_a_fit_shots_cache(tmp_path):
    with QuestionCache(tmp_path, SETTINGS) as cache:  # no "fit" in extra: what caches before --fit hold
        cache.add(TABLE[0])
    with_fit = lambda fit: CacheSettings(**{**SETTINGS.__dict__, "extra": {**SETTINGS.extra, "fit": fit}})  # noqa: E731
    QuestionCache(tmp_path, with_fit("shots")).close()  # the behaviour of then: resumes
    with pytest.raises(CacheError, match="extra.fit: 'shots' in the cache, 'truncate' now"):
        QuestionCache(tmp_path, with_fit("truncate"))


def test_prompt_fit_record_reaches_the_summary_and_is_no_setting(tmp_path):
    from npuinfer.ceval.cache import PROMPT_FIT, read_meta, record_in_meta

    with QuestionCache(tmp_path, SETTINGS) as cache:
        for r in TABLE:
            cache.add(r)
    record_in_meta(tmp_path, PROMPT_FIT, {"logic": {"shots": 5, "dropped_shots": 0, "truncated": 2}})
    record_in_meta(tmp_path, PROMPT_FIT, {"law": {"shots": 3, "dropped_shots": 2, "truncated": 0}})
    assert set(read_meta(tmp_path)[PROMPT_FIT]) == {"logic", "law"}  # merged, not replaced
    QuestionCache(tmp_path, SETTINGS).close()  # the record is not compared as a setting
    rebuild_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "2 cut from the left (lm-eval's truncation) in 1 subjects" in summary
    logic = next(line for line in summary.splitlines() if line.startswith("| logic "))
    assert logic.replace(" ", "").endswith("|5|0|2|")  # shots kept, dropped, prompts cut
    assert "prompt_fit" not in summary  # not shown as a setting
    with pytest.raises(ValueError, match="not a run record"):
        record_in_meta(tmp_path, "model", {"x": 1})
