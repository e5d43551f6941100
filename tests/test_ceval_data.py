"""C-Eval data layer: subjects, loader, prompts, synthetic data. Real files in tmp_path."""

from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import pytest

from npuinfer.ceval.dataset import (
    CevalDataError,
    Question,
    available_subjects,
    load_all,
    load_split,
    sample_dir,
)
from npuinfer.ceval.prompts import (
    build_prompt,
    first_choice_letter,
    fit_shots,
    fit_shots_for_subject,
)
from npuinfer.ceval.subjects import CATEGORIES, HARD_SUBJECTS, SUBJECTS, get_subject
from npuinfer.ceval.synth import (
    DEV_ROWS,
    SAMPLE_TEST,
    SAMPLE_VAL,
    write_sample,
    write_synthetic_ceval,
)

VAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer"]
DEV_HEADER = VAL_HEADER + ["explanation"]


def write_csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    return path


# ---- subjects ---------------------------------------------------------------------------------

def test_subjects_match_the_official_list():
    assert len(SUBJECTS) == 52
    counts = {c: sum(s.category == c for s in SUBJECTS) for c in CATEGORIES}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert sum(s.val_questions for s in SUBJECTS) == 1346
    assert all(s.dev_questions == 5 for s in SUBJECTS)
    assert len(HARD_SUBJECTS) == 8 and {get_subject(h).category for h in HARD_SUBJECTS} == {"STEM"}
    assert get_subject("computer_network").name_zh == "计算机网络"
    assert get_subject("urban_and_rural_planner").display_name == "urban and rural planner"


# ---- loader -----------------------------------------------------------------------------------

def test_values_stay_strings(tmp_path):
    write_csv(tmp_path / "val" / "logic_val.csv", VAL_HEADER, [
        ["0", "题目一", "NA", "0", "007", "1.50", "B"],
        ["1", "题目,二\n第二行", "", "N/A", "null", "-3", "A"],
    ])
    qs = load_split(tmp_path, "logic", "val")
    assert qs[0] == Question("logic", "val", "0", "题目一", ("NA", "0", "007", "1.50"), "B")
    assert qs[1].question == "题目,二\n第二行"
    assert qs[1].choices == ("", "N/A", "null", "-3")
    assert qs[1].choice("D") == "-3"


def test_test_split_has_no_answers(tmp_path):
    write_csv(tmp_path / "test" / "law_test.csv", VAL_HEADER[:-1],
              [["0", "q", "a", "b", "c", "d"]])
    (q,) = load_split(tmp_path, "law", "test")
    assert q.answer is None and q.split == "test"


def test_dev_reads_explanation_and_bom(tmp_path):
    path = tmp_path / "dev" / "law_dev.csv"
    path.parent.mkdir()
    path.write_text("\ufeffid,question,A,B,C,D,answer,explanation\n0,q,a,b,c,d,C,因为\n",
                    encoding="utf-8")
    (q,) = load_split(tmp_path, "law", "dev")
    assert q.question_id == "0" and q.answer == "C" and q.explanation == "因为"


def test_available_subjects_in_official_order(tmp_path):
    for s in ("physician", "logic", "computer_network"):
        write_csv(tmp_path / "val" / f"{s}_val.csv", VAL_HEADER,
                  [["0", "q", "a", "b", "c", "d", "A"]])
    (tmp_path / "val" / "not_a_subject_val.csv").write_text("x")
    assert available_subjects(tmp_path, "val") == ["computer_network", "logic", "physician"]
    assert list(load_all(tmp_path, "val")) == ["computer_network", "logic", "physician"]


def _bad_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "val" / "logic_val.csv"
    good = ["0", "q", "a", "b", "c", "d", "A"]
    if case == "missing column":
        return write_csv(path, VAL_HEADER[:-1], [good[:-1]])
    if case == "bad answer":
        return write_csv(path, VAL_HEADER, [good, ["1", "q", "a", "b", "c", "d", "B"],
                                            ["2", "q", "a", "b", "c", "d", "E"]])
    if case == "lowercase answer":
        return write_csv(path, VAL_HEADER, [["0", "q", "a", "b", "c", "d", "a"]])
    if case == "empty":
        path.parent.mkdir(parents=True)
        path.write_text("")
        return path
    if case == "header only":
        return write_csv(path, VAL_HEADER, [])
    if case == "duplicate id":
        return write_csv(path, VAL_HEADER, [good, ["1", "q", "a", "b", "c", "d", "B"],
                                            ["0", "q", "a", "b", "c", "d", "C"]])
    if case == "short row":
        return write_csv(path, VAL_HEADER, [good, ["1", "q", "a", "b"]])
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragments", [
    ("missing column", ["row 0 (header)", "missing column(s) answer"]),
    ("bad answer", ["row 3", "'E'", "not one of A, B, C, D"]),
    ("lowercase answer", ["row 1", "'a'"]),
    ("empty", ["empty file"]),
    ("header only", ["empty file", "no questions"]),
    ("duplicate id", ["row 3", "duplicate id '0'", "first seen in row 1"]),
    ("short row", ["row 2", "4 fields, header has 7"]),
])
def test_bad_files_name_file_and_row(tmp_path, case, fragments):
    path = _bad_file(tmp_path, case)
    with pytest.raises(CevalDataError) as err:
        load_split(tmp_path, "logic", "val")
    msg = str(err.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(CevalDataError, match="data directory not found") as err:
        load_split(tmp_path / "nope", "logic", "val")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "dev").mkdir()
    with pytest.raises(CevalDataError, match="split directory not found"):
        load_split(tmp_path, "logic", "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(CevalDataError, match="file not found") as err:
        load_split(tmp_path, "logic", "val")
    assert str(tmp_path / "val" / "logic_val.csv") in str(err.value)
    with pytest.raises(CevalDataError, match="unknown C-Eval subject 'logics'"):
        load_split(tmp_path, "logics", "val")
    assert issubclass(CevalDataError, ValueError)


# ---- prompts ----------------------------------------------------------------------------------

@pytest.fixture
def cn_data(tmp_path):
    write_csv(tmp_path / "dev" / "computer_network_dev.csv", DEV_HEADER, [
        ["0", "  TCP属于哪一层？\n", "应用层", "传输层", "网络层", "链路层", "B", "略"],
        ["1", "IP地址有多少位?", "16", "32", "64", " 128", "B", ""],
        ["2", "HTTP默认端口", "80", "21", "NA", "25", "A", ""],
    ])
    write_csv(tmp_path / "val" / "computer_network_val.csv", VAL_HEADER, [
        ["7", " 下列哪个是路由协议____ ", "OSPF", "FTP", "SMTP", "DNS", "A"],
        ["8", "短", "a", "b", "c", "d", "D"],
    ])
    return (load_split(tmp_path, "computer_network", "dev"),
            load_split(tmp_path, "computer_network", "val"))


def test_lmeval_prompt_byte_for_byte(cn_data):
    dev, val = cn_data
    # Built by hand from REFERENCE.md section 3: description + shot_1 + "\n\n" + shot_2 + "\n\n"
    # + block(question); shot = block + " " + answer; only the question is stripped.
    expected = (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "TCP属于哪一层？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 链路层\n答案： B\n\n"
        "IP地址有多少位?\nA. 16\nB. 32\nC. 64\nD.  128\n答案： B\n\n"
        "下列哪个是路由协议____\nA. OSPF\nB. FTP\nC. SMTP\nD. DNS\n答案："
    )
    parts = build_prompt("lmeval", "computer_network", dev[:2], val[0])
    assert parts.context.encode("utf-8") == expected.encode("utf-8")
    assert parts.prefix == expected[: expected.index("下列哪个")]
    assert parts.question_text == "下列哪个是路由协议____\nA. OSPF\nB. FTP\nC. SMTP\nD. DNS\n答案："
    assert parts.continuations == (" A", " B", " C", " D")


def test_lmeval_zero_shot_is_description_plus_block(cn_data):
    _, val = cn_data
    parts = build_prompt("lmeval", "computer_network", [], val[1])
    assert parts.context == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n短\nA. a\nB. b\nC. c\nD. d\n答案："
    )


def test_atb_prompt_byte_for_byte(cn_data):
    dev, val = cn_data
    expected = (
        "The following are multiple choice questions (with answers) about computer network.\n\n"
        "  TCP属于哪一层？\n\nA. 应用层\nB. 传输层\nC. 网络层\nD. 链路层\nAnswer: B\n\n"
        "短\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    assert build_prompt("atb", "computer_network", dev[:1], val[1]).context == expected
    assert first_choice_letter(" C. 网络层") == "C"
    assert first_choice_letter("不知道") is None


def test_prompt_rejects_other_subject(cn_data):
    dev, val = cn_data
    other = Question("logic", "val", "0", "q", ("a", "b", "c", "d"), "A")
    with pytest.raises(ValueError, match="logic"):
        build_prompt("lmeval", "computer_network", dev, other)
    with pytest.raises(KeyError, match="unknown prompt template"):
        build_prompt("mmlu", "computer_network", dev, val[0])


def test_fit_shots_drops_from_the_end(cn_data):
    dev, val = cn_data
    q = val[0]

    def ctx(k: int) -> str:
        return build_prompt("lmeval", "computer_network", dev[:k], q).context

    assert fit_shots("lmeval", "computer_network", dev, q, 3, len, len(ctx(3))) == dev
    assert fit_shots("lmeval", "computer_network", dev, q, 3, len, len(ctx(3)) - 1) == dev[:2]
    assert fit_shots("lmeval", "computer_network", dev, q, 3, len, len(ctx(1))) == dev[:1]
    assert fit_shots("lmeval", "computer_network", dev, q, 2, len, 10**6) == dev[:2]
    assert fit_shots("lmeval", "computer_network", dev, q, 3, len, 5) == []
    with pytest.raises(ValueError, match="only 3 dev rows"):
        fit_shots("lmeval", "computer_network", dev, q, 4, len, 10**6)


def test_fit_shots_for_subject_fits_the_longest_question(cn_data):
    dev, (_, short_q) = cn_data
    long_q = Question("computer_network", "val", "9", "长" * 60, ("a", "b", "c", "d"), "C")
    val = [short_q, long_q]
    budget = len(build_prompt("lmeval", "computer_network", dev[:2], long_q).context)
    assert fit_shots("lmeval", "computer_network", dev, short_q, 3, len, budget) == dev
    shots = fit_shots_for_subject("lmeval", "computer_network", dev, val, 3, len, budget)
    assert shots == dev[:2]
    for q in val:
        assert len(build_prompt("lmeval", "computer_network", shots, q).context) <= budget


def test_fit_shots_for_subject_leaves_out_questions_too_long_alone(cn_data):
    dev, (_, short_q) = cn_data
    huge = Question("computer_network", "val", "9", "长" * 400, ("a", "b", "c", "d"), "C")
    budget = len(build_prompt("lmeval", "computer_network", dev, short_q).context)
    asked = []

    def fits_alone(q: Question) -> bool:
        asked.append(q.question_id)
        return len(build_prompt("lmeval", "computer_network", [], q).context) <= budget

    # the huge question does not cost the short one its 3 shots; asked about: the huge one, then one that
    # shows some question fits alone
    assert fit_shots_for_subject("lmeval", "computer_network", dev, [short_q, huge], 3, len, budget,
                                 fits_alone) == dev
    assert asked == ["9", short_q.question_id]
    # without the rule it takes every shot
    assert fit_shots_for_subject("lmeval", "computer_network", dev, [short_q, huge], 3, len, budget) == []
    # no question fits even alone: no shots (they would only be cut away)
    alone = Question("computer_network", "val", "8", "长" * 200, ("a", "b", "c", "d"), "C")
    budget = len(build_prompt("lmeval", "computer_network", [], alone).context) - 1
    assert fit_shots_for_subject("lmeval", "computer_network", dev, [alone, huge], 3, len, budget, fits_alone) == []


# ---- synthetic data ---------------------------------------------------------------------------

def test_synth_loads_with_official_counts(tmp_path):
    write_synthetic_ceval(tmp_path)
    assert available_subjects(tmp_path, "val") == [s.name for s in SUBJECTS]
    val = load_all(tmp_path, "val")
    dev = load_all(tmp_path, "dev")
    test = load_all(tmp_path, "test")
    for s in SUBJECTS:
        assert len(val[s.name]) == s.val_questions
        assert len(dev[s.name]) == DEV_ROWS == s.dev_questions
        assert all(q.answer is None for q in test[s.name])
    assert sum(map(len, val.values())) == 1346
    answers = {q.answer for qs in val.values() for q in qs}
    assert answers == {"A", "B", "C", "D"}


def test_synth_is_deterministic_per_seed(tmp_path):
    a, b, c, sub = (tmp_path / n for n in ("a", "b", "c", "sub"))
    for d, seed in ((a, 1), (b, 1), (c, 2)):
        write_synthetic_ceval(d, subjects=["logic", "law"], val_per_subject=4, seed=seed)
    write_synthetic_ceval(sub, subjects=["law"], val_per_subject=4, seed=1)
    files = ["val/logic_val.csv", "val/law_val.csv", "dev/law_dev.csv", "test/law_test.csv"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes()
    assert (sub / "val/law_val.csv").read_bytes() == (a / "val/law_val.csv").read_bytes()
    assert len(load_split(a, "logic", "val")) == 4


def test_shipped_sample_is_current_and_loads(tmp_path):
    shipped = sample_dir()
    write_sample(tmp_path)
    for split in ("dev", "val", "test"):
        names = sorted(p.name for p in (tmp_path / split).iterdir())
        assert sorted(p.name for p in (shipped / split).iterdir()) == names
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / split, shipped / split, names,
                                                   shallow=False)
        assert not mismatch and not errors, "regenerate with: python -m npuinfer.ceval.synth"
    val = load_all(shipped, "val")
    assert list(val) == [s.name for s in SUBJECTS]
    assert {len(v) for v in val.values()} == {SAMPLE_VAL}
    assert {len(v) for v in load_all(shipped, "dev").values()} == {DEV_ROWS}
    assert {len(v) for v in load_all(shipped, "test").values()} == {SAMPLE_TEST}
