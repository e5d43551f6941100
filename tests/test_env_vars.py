"""Environment variables read by npuinfer: a bad value is one clear line naming the variable, never a
traceback. `npuinfer infer` on the real qwen-tiny checkpoint (in process; the kernel plugin in a subprocess,
since plugins load once per process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.cli import main

REPO = Path(__file__).resolve().parents[1]
INFER = ["infer", "--model", "qwen-tiny", "--max-new-tokens", "2", "hi"]


def one_error_line(capsys) -> str:
    """The one line that says what went wrong (infer may print a note before it), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("value", ["²", "0", "-3", "4k"])
def test_a_bad_max_seq_len_names_the_variable(value, monkeypatch, capsys):
    monkeypatch.setenv("MAX_SEQ_LEN", value)
    assert main(INFER) != 0
    line = one_error_line(capsys)
    assert "environment variable MAX_SEQ_LEN" in line and repr(value) in line and "positive integer" in line


@pytest.mark.parametrize("content", ["KEY:0", "KEY:-5", "KEY:NaN",
                                     'KEY:"fast"', "not json at all", "[1, 2]"])
def test_a_bad_peaks_file_names_the_variable_and_the_file(content, tmp_path, monkeypatch, capsys):
    """A zero peak gave ZeroDivisionError, a string a TypeError, garbage a JSON error without the file."""
    import torch

    key = f"bandwidth cpu torch.float32 {torch.get_num_threads()} threads"
    if content.startswith("KEY:"):
        content = f'{{"{key}": [{content[4:]}, "probe"]}}'
    peaks = tmp_path / "peaks.json"
    peaks.write_text(content)
    monkeypatch.setenv("NPUINFER_PEAKS_FILE", str(peaks))
    assert main(INFER) != 0
    line = one_error_line(capsys)
    assert f"error: environment variable NPUINFER_PEAKS_FILE: {peaks}: " in line, line


def test_an_unimportable_kernel_plugin_is_one_line_naming_the_variable():
    env = {**os.environ, "NPUINFER_KERNEL_PLUGINS": "no_such_module", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "npuinfer", *INFER], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "environment variable NPUINFER_KERNEL_PLUGINS" in lines[0] \
        and "'no_such_module'" in lines[0], proc.stderr
