"""`npuinfer quantize` on a checkpoint holding a NaN or infinite weight: refused before anything is written,
naming the tensor as the checkpoint names it. W8A8 failed with "cannot convert float NaN to integer" and no
tensor; W8A16 wrote a checkpoint that failed later, at inference. A real tiny checkpoint with one value edited."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from npuinfer.cli import main

TENSOR = "transformer.h.1.mlp.c_proj.weight"  # qwen-tiny's names


@pytest.mark.parametrize("scheme,value", [("--w8a8", float("nan")), ("--w8a16", float("nan")),
                                          ("--w8a16", float("-inf"))])
def test_a_non_finite_weight_is_refused_naming_the_tensor_and_nothing_is_written(scheme, value, tiny_dir, tmp_path,
                                                                                  capsys):
    model = tmp_path / "qwen"
    shutil.copytree(tiny_dir("qwen-tiny"), model)
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][TENSOR]
    state = load_file(str(shard))
    state[TENSOR][3, 5] = value
    save_file(state, str(shard), metadata={"format": "pt"})
    out = tmp_path / "quantized"
    assert main(["quantize", "--model-path", str(model), scheme, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"non-finite (NaN or infinite) weights in {TENSOR} (1 of " in err and "nothing was written" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["qwen"]
