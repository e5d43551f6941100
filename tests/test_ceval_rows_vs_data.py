"""C-Eval cache rows checked against the data they claim to be scored on: a row for a question id the data
lacks counted in subject_acc.json (law 0.6 = 3/5 against the run's own 0.3333, n=3), a cached answer that
differs from the data's was trusted. On resume (CevalRun.run_subject) and in `npuinfer report ceval`, such a
row is an error naming the file and row, and nothing is rewritten. A real qwen-tiny run on the shipped sample."""
from __future__ import annotations

import shutil

import pytest

from npuinfer.backends.npuinfer import NpuinferBackend
from npuinfer.ceval.cache import CacheError
from npuinfer.ceval.dataset import sample_dir
from npuinfer.ceval.run import CevalRun, RunSettings
from npuinfer.cli import main

SUBJECT = "law"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, npuinfer_cache):
    """(loaded model, data, a results directory where law's 3 val questions were scored, zero-shot)."""
    from npuinfer.runtime import load_model

    loaded = NpuinferBackend(load_model("qwen-tiny", device="cpu", dtype="fp32"))
    data = tmp_path_factory.mktemp("data") / "ceval"
    shutil.copytree(sample_dir(), data)
    out = tmp_path_factory.mktemp("scored") / "ceval_qwen-tiny_cpu"
    run = CevalRun(loaded, RunSettings(data, shots=0), out)
    try:
        assert run.run_subject(SUBJECT).questions == 3
    finally:
        run.close()
    assert main(["report", "ceval", str(out)]) == 0
    return loaded, data, out


def tampered(scored, tmp_path, edit) -> tuple[object, object, object]:
    loaded, data, out = scored
    copy = tmp_path / out.name
    shutil.copytree(out, copy)
    lines = (copy / "cache.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (copy / "cache.csv").write_text("".join(edit(lines)), encoding="utf-8")
    return loaded, data, copy


def foreign_rows(lines: list[str]) -> list[str]:
    """Two rows for law ids 97 and 98, which the data does not have, both predicted right."""
    return lines + [f"{SUBJECT},97,A,A,1,\n", f"{SUBJECT},98,B,B,1,\n"]  # no log-likelihoods (the last column)


def other_answer(lines: list[str]) -> list[str]:
    """law id 0's answer is A in the data; the row says its prediction was the answer."""
    out = []
    for line in lines:
        subject, qid, answer, prediction, correct, logprobs = line.rstrip("\n").split(",")
        if (subject, qid) == (SUBJECT, "0") and answer != prediction:
            line = f"{subject},{qid},{prediction},{prediction},1,{logprobs}\n"
        out.append(line)
    assert out != lines, "the tiny model answered law 0 right: pick another row"
    return out


@pytest.mark.parametrize("edit,named", [(foreign_rows, ["row 4: law id 97 is no question of", "row 5: law id 98"]),
                                        (other_answer, ["row 1: law id 0 has answer"])])
def test_resume_refuses_rows_that_do_not_match_the_data_and_adds_nothing(scored, tmp_path, edit, named):
    loaded, data, out = tampered(scored, tmp_path, edit)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    run = CevalRun(loaded, RunSettings(data, shots=0), out)
    try:
        with pytest.raises(CacheError) as caught:
            run.run_subject(SUBJECT)
    finally:
        run.close()
    message = str(caught.value)
    assert all(f"{out / 'cache.csv'} {n}" in message for n in named), message
    assert str(data / "val" / "law_val.csv") in message and "nothing was rewritten" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("edit,named", [(foreign_rows, "row 4: law id 97 is no question of"),
                                        (other_answer, "row 1: law id 0 has answer")])
def test_report_refuses_rows_that_do_not_match_the_data_and_writes_nothing(scored, tmp_path, capsys, edit, named):
    _, data, out = tampered(scored, tmp_path, edit)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["report", "ceval", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'cache.csv'} {named}" in err and str(data / "val" / "law_val.csv") in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # subject_acc.json too
