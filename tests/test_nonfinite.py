"""NaN / inf logits are detected (issue 12 item 3): infer names the step, a bench row gets status nonfinite and
the case fails, a C-Eval question is an error and never scored. Real checkpoints with a poisoned final norm."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.cli import main

REPO = Path(__file__).resolve().parents[1]
FINAL_NORM = "transformer.ln_f.weight"  # qwen layout


def poisoned_copy(tiny_dir, target: Path, value: float) -> Path:
    """qwen-tiny with every element of its final norm weight set to ``value``."""
    shutil.copytree(tiny_dir("qwen-tiny"), target)
    for shard in target.glob("*.safetensors"):
        tensors = load_file(shard)
        if FINAL_NORM in tensors:
            tensors[FINAL_NORM] = torch.full_like(tensors[FINAL_NORM], value)
            save_file(tensors, shard, metadata={"format": "pt"})
            return target
    raise AssertionError(f"{FINAL_NORM} not found")


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tiny_dir) -> Path:
    return poisoned_copy(tiny_dir, tmp_path_factory.mktemp("nan") / "qwen-nan", float("nan"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_ceval(tmp_path_factory.mktemp("ceval"), subjects=["law"], val_per_subject=3,
                                 test_per_subject=1)


def test_infer_with_nan_weights_is_an_error_naming_the_step(nan_model, capsys):
    assert main(["infer", "--model-path", str(nan_model), "--device", "cpu", "--max-new-tokens", "3", "hi"]) == 1
    err = capsys.readouterr().err
    assert "non-finite logits (NaN or inf) at the prompt's forward (step 0, prefill), batch row(s) 0" in err


def test_fp16_overflow_is_caught_where_fp32_is_fine(tmp_path, tiny_dir, capsys):
    big = poisoned_copy(tiny_dir, tmp_path / "qwen-1e5", 1e5)
    argv = ["infer", "--model-path", str(big), "--device", "cpu", "--max-new-tokens", "2", "hi"]
    assert main([*argv, "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main([*argv, "--dtype", "fp16"]) == 1
    assert "non-finite logits (NaN or inf) at the prompt's forward (step 0, prefill)" in capsys.readouterr().err


@pytest.mark.parametrize("scoring", ["prefix", "generate"])
def test_ceval_question_with_nan_logits_is_an_error_never_scored(nan_model, data, tmp_path, scoring):
    from npuinfer.ceval.cache import read_cache
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.ceval.run import CevalRun, NonFiniteScores, RunSettings
    from npuinfer.runtime import load_model

    loaded = load_model(model_path=nan_model, device="cpu", dtype="fp32")
    run = CevalRun(NpuinferBackend(loaded), RunSettings(data, scoring=scoring, max_new_tokens=2), tmp_path)
    with pytest.raises(NonFiniteScores, match=r"law: non-finite logits \(NaN or inf\) for 3 question\(s\)"):
        run.run_subject("law")
    run.close()
    assert read_cache(tmp_path) == []  # nothing scored, nothing cached: a rerun tries them again


def test_bench_row_gets_status_nonfinite_and_the_case_fails(nan_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/test_performance.py", "-p", "no:cacheprovider",
                           "-q", "--model-path", str(nan_model), "--device", "cpu", "--batch-sizes", "1",
                           "--case-pairs", "8x4", "--rounds", "1", "--warmup", "0", "--results-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 failed" in proc.stdout and "non-finite logits" in proc.stdout
    [csv_path] = tmp_path.glob("performance_*.csv")
    with open(csv_path, newline="") as fh:
        [row] = list(csv.DictReader(fh))
    assert row["status"] == "nonfinite" and "step 0" in row["reason"]
    assert row["ResponseTime(s)"] == "" and row["E2E throughput (token/s)"] == ""


def test_hf_backend_with_nan_weights_raises_like_npuinfer(nan_model, tiny_dir):
    """--backend hf runs the same non-finite check (so a side-by-side bench row is "nonfinite", not a timing of
    NaN tokens); on the finite checkpoint it generates as before."""
    from npuinfer.device import Device
    from npuinfer.generate import NonFiniteLogits
    from npuinfer.backends.hf_model import HFBackend

    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(NonFiniteLogits, match=r"step 0, prefill\), batch row\(s\) 0"):
        HFBackend.load(nan_model, Device("cpu"), torch.float32).generate(ids, mask, 3)
    assert HFBackend.load(tiny_dir("qwen-tiny"), Device("cpu"), torch.float32).generate(ids, mask, 3).shape == (1, 3)
