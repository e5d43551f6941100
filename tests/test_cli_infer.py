"""`npuinfer infer` and `npuinfer make-tiny`: as a user runs them (subprocess) and in-process for the error paths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from npuinfer.cli import main

PROMPT = "苹果公司的CEO是"


def run_cli(*args: str, console_script: bool = False) -> subprocess.CompletedProcess:
    exe = shutil.which("npuinfer") if console_script else None
    cmd = [exe] if exe else [sys.executable, "-m", "npuinfer"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_infer_qwen_tiny_prints_a_continuation():
    res = run_cli("infer", "--model", "qwen-tiny", PROMPT, console_script=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROMPT) and len(lines[0]) > len(PROMPT)
    assert "Traceback" not in res.stderr
    # after the continuations, on stderr: the timing block (npuinfer/commands/infer.py timing_block)
    timing = res.stderr.strip().splitlines()[-5:]
    assert timing[0].startswith("  first token: ") and timing[1].startswith("  next token:  ")
    assert " tokens/s " in timing[2] and "MBU:         0." in timing[3] and "GB/s measured (probe: " in timing[3]
    assert timing[4].startswith("  weights:     tiny random (qwen-tiny")


def test_infer_with_no_options_runs_the_default():
    res = run_cli("infer")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(PROMPT) and len(res.stdout.strip()) > len(PROMPT)


def test_make_tiny_as_a_module(tmp_path):
    out = tmp_path / "internlm"
    res = run_cli("make-tiny", "internlm-tiny", str(out))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "internlm"
    assert (out / "pytorch_model.bin.index.json").is_file() and (out / "tokenizer.model").is_file()


def test_bad_option_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as info:
        main(["infer", "--bogus-option", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--bogus-option" in err


@pytest.mark.parametrize("argv,needle", [
    (["--dtype", "fp8"], "--dtype"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-seq-len", "-4"], "--max-seq-len"),
    (["--attention", "flash"], "--attention"),
])
def test_bad_option_values_are_usage_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(["infer", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_make_tiny_of_a_real_name_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["make-tiny", "internlm-7b", str(tmp_path / "x")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "internlm-7b" in err and "internlm-tiny" in err


@pytest.mark.parametrize("argv,needles", [
    (["--model", "internlm-7b"], ["--model-path", "NPUINFER_MODELS_DIR", "internlm-tiny"]),
    (["--model", "nope"], ["unknown model 'nope'", "qwen-tiny"]),
    (["--model", "internlm-tiny", "--max-seq-len", "8"], ["KV cache limit of 8", "--max-seq-len"]),
    (["--model-path", "/nonexistent/ckpt"], ["/nonexistent/ckpt", "does not exist"]),
])
def test_bad_input_exits_1_with_the_message(capsys, monkeypatch, argv, needles):
    monkeypatch.delenv("NPUINFER_MODELS_DIR", raising=False)
    assert main(["infer", *argv, PROMPT]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("npuinfer infer: error:")
    for needle in needles:
        assert needle in captured.err
    assert captured.out == ""


def test_several_prompts_and_model_path_alone(capsys, tiny_dir, load_tiny):
    from npuinfer.generate import generate

    prompts = ["The capital of France is", PROMPT]
    assert main(["infer", "--model-path", str(tiny_dir("gpt-neox-tiny")), "--device", "cpu", "--no-stop",
                 "--max-new-tokens", "6", *prompts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    tok, model = load_tiny("gpt-neox-tiny").tokenizer, load_tiny("gpt-neox-tiny").model
    ids, mask = tok.encode_batch(prompts)
    expected = generate(model, ids, 6, mask)
    for line, prompt, row in zip(lines, prompts, expected.tolist()):
        assert line == prompt + tok.decode(row)
