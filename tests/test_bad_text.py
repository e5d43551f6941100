"""Text that is not what it should be: prompts that are not valid UTF-8, and C-Eval files saved as GBK, with a
field over the csv limit, with a question whose four choices are empty, or with fewer dev rows than --shot.
Each names the file (and row) or the prompt's position and says what to do. Real files, real tokenizers."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from npuinfer.ceval.dataset import CevalDataError, load_split, sample_dir
from npuinfer.cli import main

SUBJECT = "law"


@pytest.fixture
def data(tmp_path) -> Path:
    copy = tmp_path / "ceval"
    shutil.copytree(sample_dir(), copy)
    return copy


def val_file(data: Path) -> Path:
    return data / "val" / f"{SUBJECT}_val.csv"


def test_a_prompt_that_is_not_utf8_is_named_by_position_before_loading(capsys):
    # b"\xff" on a command line reaches Python as the lone surrogate '\udcff' (surrogateescape)
    with pytest.raises(SystemExit) as exit_:
        main(["infer", "--model", "gpt-neox-tiny", "--max-new-tokens", "2", "fine", "caf\udcc3 \udcff"])
    assert exit_.value.code == 2  # a usage error
    err = capsys.readouterr().err
    assert "PROMPT 2 of 2: not valid UTF-8 (byte 0xc3 at byte 3)" in err and "UTF-8 text" in err, err


@pytest.mark.parametrize("model,family", [("gpt-neox-tiny", "gpt_neox"), ("internlm-tiny", "internlm"),
                                          ("qwen-tiny", "qwen")])
def test_every_tokenizer_refuses_text_that_is_not_utf8_naming_the_place(model, family, tiny_dir):
    """gpt-neox-tiny (tokenizers) raised 'TextInputSequence must be str', internlm-tiny (sentencepiece) 'Unable
    to cast Python instance', neither naming the place."""
    from npuinfer.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_dir(model), family)
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 0xff at byte 2\)"):
        tok.encode("ok\udcff")
    assert tok.encode("ok") == tok.encode("ok")  # a valid text still encodes


def test_a_gbk_file_names_the_file_and_says_to_convert(data):
    path = val_file(data)
    path.write_bytes(path.read_text(encoding="utf-8").encode("gbk", errors="replace"))
    with pytest.raises(CevalDataError) as caught:
        load_split(data, SUBJECT, "val")
    assert str(caught.value).startswith(f"{path}: not UTF-8 text (byte 0x") and "iconv -f GBK -t UTF-8" in str(caught.value)


def test_a_field_over_the_csv_limit_names_the_file_and_line(data):
    path = val_file(data)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(2, f'7,"{"很长" * 100_000}",a,b,c,d,A\n')  # a 200,000-character question on line 3
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CevalDataError) as caught:
        load_split(data, SUBJECT, "val")
    message = str(caught.value)
    assert message.startswith(f"{path}: from line 3: not CSV") and "field larger than field limit" in message
    assert "quote left open" in message


def test_a_question_with_four_empty_choices_names_the_row(data):
    path = val_file(data)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.append("9,什么?,,, ,,B\n")
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CevalDataError, match=rf"{path}: row {len(lines) - 1} \(line {len(lines)}\): id '9' has all "
                                             r"four choices A-D empty"):
        load_split(data, SUBJECT, "val")


def test_more_shots_than_dev_rows_names_the_dev_file(data, tmp_path, npuinfer_cache):
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.ceval.run import CevalRun, RunSettings
    from npuinfer.runtime import load_model

    dev = data / "dev" / f"{SUBJECT}_dev.csv"
    dev.write_text("".join(dev.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    run = CevalRun(NpuinferBackend(load_model("qwen-tiny", device="cpu", dtype="fp32")), RunSettings(data, shots=5),
                   tmp_path / "out")
    try:
        with pytest.raises(CevalDataError) as caught:
            run.run_subject(SUBJECT)
    finally:
        run.close()
    assert str(caught.value) == (f"{dev}: 1 row(s), and 5 shots were asked for (--shot): pass --shot 1 or fewer, "
                                 "or add dev rows")
