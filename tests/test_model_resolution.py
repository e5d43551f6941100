"""First contact: a model that cannot be found, or a directory that is not its checkpoint, is one usage error
when the session starts (pytest exit status 4, no traceback, no case run) or when `npuinfer infer` starts,
naming what was looked for and the stand-in to try."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.locate import ModelUnavailable, locate_model

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], models_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NPUINFER_MODELS_DIR": str(models_dir)}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def assert_one_message(proc: subprocess.CompletedProcess, needles: list[str]) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "raise " not in text, text[-3000:]
    messages = [line for line in text.splitlines() if line.strip()]
    assert len(messages) == 1, text[-3000:]
    for needle in needles:
        assert needle in messages[0], messages[0]
    return messages[0]


@pytest.mark.parametrize("suite,model,stand_in", [("accuracy/", "internlm-7b", "internlm-tiny"),
                                                  ("bench/", "qwen-7b", "qwen-tiny")])
def test_suite_without_weights_is_one_usage_error(tmp_path, suite, model, stand_in):
    empty = tmp_path / "models"
    empty.mkdir()
    proc = run(["-m", "pytest", suite, "--model", model, "-p", "no:cacheprovider", "-q",
                "--results-dir", str(tmp_path / "results")], empty, tmp_path)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = assert_one_message(proc, [model, "--model-path", str(empty / model), f"--model {stand_in}"])
    assert line.startswith("ERROR:")
    assert not (tmp_path / "results").exists()  # nothing ran


def test_a_path_that_is_not_a_checkpoint_is_one_usage_error(tmp_path, tiny_dir):
    half = tmp_path / "half-download"
    half.mkdir()
    shutil.copy(tiny_dir("qwen-tiny") / "config.json", half / "config.json")  # config, but no weights
    proc = run(["-m", "pytest", "bench/", "--model-path", str(half), "-p", "no:cacheprovider", "-q",
                "--results-dir", str(tmp_path / "results")], tmp_path, tmp_path)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_one_message(proc, [f"--model-path {half}", "no weights found", "model.safetensors", "--model qwen-tiny"])


def test_infer_without_weights_is_one_message(tmp_path, monkeypatch, capsys):
    from npuinfer.cli import main

    monkeypatch.setenv("NPUINFER_MODELS_DIR", str(tmp_path))
    assert main(["infer", "--model", "internlm-7b", "hello"]) == 1  # cli.main turns it into one line on stderr
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    for needle in ["npuinfer infer: error:", "internlm-7b", str(tmp_path / "internlm-7b"), "--model internlm-tiny"]:
        assert needle in captured.err


# ------------------------------------------------------------------ locate_model itself (no subprocess)


def test_tiny_names_need_no_check_and_are_not_built(monkeypatch, tmp_path):
    monkeypatch.setenv("NPUINFER_CACHE", str(tmp_path / "cache"))
    assert locate_model("gpt-neox-tiny") is None
    assert not (tmp_path / "cache").exists()


def test_a_checkpoint_of_another_model_is_named(monkeypatch, tmp_path, tiny_dir):
    shutil.copytree(tiny_dir("internlm-tiny"), tmp_path / "internlm-7b")
    monkeypatch.setenv("NPUINFER_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelUnavailable) as info:
        locate_model("internlm-7b")
    msg = str(info.value)
    assert "$NPUINFER_MODELS_DIR/internlm-7b" in msg and "does not describe internlm-7b" in msg
    assert "--model internlm-tiny" in msg
    with pytest.raises(ModelUnavailable, match="describes a qwen model .* not internlm-7b"):
        locate_model("internlm-7b", tiny_dir("qwen-tiny"))
    assert locate_model("internlm-tiny", tiny_dir("internlm-tiny")) == tiny_dir("internlm-tiny")
    assert locate_model(None, tiny_dir("gpt-neox-tiny")) == tiny_dir("gpt-neox-tiny")


def test_unknown_name_and_missing_model_with_dummy_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("NPUINFER_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="unknown model 'llama-99b'.*qwen-tiny"):
        locate_model("llama-99b")
    assert locate_model("qwen-7b", dummy_weights=True) is None  # random weights of the real size: nothing to find
    (tmp_path / "qwen-7b").mkdir()
    (tmp_path / "qwen-7b" / "config.json").write_text(json.dumps({"model_type": "qwen"})[:-1])  # cut short
    with pytest.raises(ModelUnavailable, match="not valid JSON"):
        locate_model("qwen-7b", dummy_weights=True)  # a directory that is there is checked all the same
