"""--memory-limit holds for a checkpoint as for --dummy-weights: the same prediction (npuinfer.memory) refuses a
model that cannot fit before a weight file is read, in `npuinfer infer` and in `pytest bench/` (either backend).
A W8 quantized checkpoint is predicted with one byte per linear weight. Real tiny checkpoints."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npuinfer.cli import main
from npuinfer.dummy import DoesNotFit, predicted_load_bytes
from npuinfer.memory import format_size
from npuinfer.runtime import load_model

REPO = Path(__file__).resolve().parents[1]


def test_infer_refuses_a_checkpoint_beyond_the_memory_limit_before_reading_a_weight(tiny_dir, tmp_path, capsys):
    model = tmp_path / "qwen"
    shutil.copytree(tiny_dir("qwen-tiny"), model)
    for shard in model.glob("*.safetensors"):
        shard.write_bytes(b"not weights")  # read, they would be an error of their own
    assert main(["infer", "--model-path", str(model), "--memory-limit", "1KiB", "hi"]) == 1
    err = capsys.readouterr().err
    need = format_size(predicted_load_bytes(load_model("qwen-tiny", device="cpu", dtype="fp32").args, torch.float32))
    assert (f"{model} with checkpoint fp32 weights needs about {need} for its weights alone" in err
            and "more than --memory-limit 1KiB; nothing was allocated" in err), err


@pytest.mark.parametrize("backend", ["npuinfer", "hf"])
def test_bench_refuses_a_checkpoint_beyond_the_memory_limit(backend, tmp_path, tiny_dir):
    tiny_dir("qwen-tiny")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "bench/test_performance.py",
                           "--model", "qwen-tiny", "--backend", backend, "--memory-limit", "1KiB", "--batch-sizes", "1",
                           "--case-pairs", "8x2", "--rounds", "1", "--warmup", "0", "--results-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-3000:]
    assert "with checkpoint fp32 weights needs about" in proc.stdout
    assert "more than --memory-limit 1KiB; nothing was allocated" in proc.stdout
    assert not list(tmp_path.glob("performance_*.csv"))  # nothing ran


def test_a_quantized_checkpoint_is_predicted_with_int8_linears(tiny_dir, tmp_path):
    from npuinfer.quantize import quantize_checkpoint

    out = tmp_path / "w8a16"
    quantize_checkpoint(tiny_dir("qwen-tiny"), out, "W8A16")
    args = load_model("qwen-tiny", device="cpu", dtype="fp32").args
    as_float, as_int8 = predicted_load_bytes(args, torch.float32), predicted_load_bytes(args, torch.float32, True)
    assert as_int8 < as_float
    between = (as_int8 + as_float) // 2  # a limit a float copy would not fit, the quantized one does
    loaded = load_model(model_path=out, device="cpu", dtype="fp32", memory_limit=between)
    assert loaded.quantization["quantization"] == "W8A16"
    with pytest.raises(DoesNotFit, match="nothing was allocated"):
        load_model("qwen-tiny", device="cpu", dtype="fp32", memory_limit=between)
