"""Bad options and files are refused with a message naming them (issue 12 item 7); no traceback, no blank rows."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.cli import main
from npuinfer.gates.performance import PerformanceBaseline
from npuinfer.results.performance import performance_row, performance_table
from npuinfer.results.table import ResultFileError

REPO = Path(__file__).resolve().parents[1]
ROW = {"model": "qwen-tiny", "batch_size": 1, "input_seq_len(Encoding)": 8, "output_seq_len(Decoding)": 4}


def test_a_binary_baseline_csv_is_an_error_naming_the_file(tmp_path):
    csv_path = tmp_path / "performance_qwen-tiny_cpu.csv"
    csv_path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ResultFileError, match=f"{csv_path}: not a CSV text file"):
        PerformanceBaseline(tmp_path).find(ROW, "cpu")
    csv_path.write_bytes(b"batch_size\x00,x\n1\x00,2\n")  # UTF-8, yet binary: NUL bytes
    with pytest.raises(ResultFileError, match=f"{csv_path}: not a CSV text file \\(NUL bytes"):
        PerformanceBaseline(tmp_path).find(ROW, "cpu")


def test_a_foreign_csv_in_the_results_dir_is_refused_not_merged(tmp_path):
    path = tmp_path / "performance_qwen-tiny_cpu.csv"
    path.write_text("a,b\n1,2\n")
    table = performance_table(path)
    with pytest.raises(ResultFileError) as err:
        table.upsert(performance_row(1, 8, 4, {"model": "qwen-tiny"}))
    assert str(path) in str(err.value) and "its header (a,b) lacks the key column(s) model," in str(err.value)
    assert path.read_text() == "a,b\n1,2\n"


def test_an_empty_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["infer", "--model", "qwen-tiny", "hello", ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "PROMPT 2 of 2: the prompt is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("suite", ["bench/test_performance.py", "accuracy"])
def test_results_dir_under_a_regular_file_is_a_usage_error(tmp_path, suite):
    regular = tmp_path / "plain.txt"
    regular.write_text("not a directory\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", suite, "-p", "no:cacheprovider", "-q", "--model",
                           "qwen-tiny", "--results-dir", str(regular / "results")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert f"--results-dir {regular / 'results'}: {regular} is a file, not a directory" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_binary_accuracy_baseline_is_an_error_naming_the_file(tmp_path):
    from npuinfer.gates.accuracy import read_subject_accuracy

    path = tmp_path / "subject_acc.json"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=f"{path}: not a JSON file of subject accuracies"):
        read_subject_accuracy(path)
