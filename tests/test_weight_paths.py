"""Which files a loader opens (npuinfer.weight_index, README's "Weight files are named from the model
directory"): an index, float or MindIE quantized, names relative paths inside the model directory only;
every weight file is a regular file, which a symlink may point to wherever it lies (as the Hugging Face cache
does), never a device, FIFO or directory. Real tiny checkpoints and a real `npuinfer quantize` output."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from npuinfer.checkpoint import CheckpointError
from npuinfer.cli import main
from npuinfer.runtime import load_model

REPO = Path(__file__).resolve().parents[1]
FLOAT_SHARD = "model-00002-of-00002.safetensors"  # gpt-neox-tiny's second shard
FLOAT_INDEX = "model.safetensors.index.json"
QUANT_WEIGHTS = "quant_model_weight_w8a16.safetensors"
QUANT_INDEX = "quant_model_weight_w8a16.safetensors.index.json"


def load(path: Path):
    return load_model(None, model_path=path, device="cpu", dtype="fp32")


@pytest.fixture
def float_dir(tiny_dir, tmp_path) -> Path:
    d = tmp_path / "models" / "gpt-neox"
    shutil.copytree(tiny_dir("gpt-neox-tiny"), d)
    return d


@pytest.fixture
def quant_dir(tiny_dir, tmp_path) -> Path:
    """qwen-tiny quantized W8A16 by npuinfer quantize, with an index naming its one weight file."""
    from npuinfer.quantize import quantize_checkpoint

    d = tmp_path / "models" / "qwen-w8a16"
    quantize_checkpoint(tiny_dir("qwen-tiny"), d, "W8A16")
    from safetensors import safe_open

    with safe_open(str(d / QUANT_WEIGHTS), "pt") as fh:
        names = list(fh.keys())
    (d / QUANT_INDEX).write_text(json.dumps({"weight_map": {n: QUANT_WEIGHTS for n in names}}))
    return d


def point_index(index: Path, shard: str, entry: str) -> None:
    data = json.loads(index.read_text())
    data["weight_map"] = {k: entry if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["float", "quantized"])
def test_an_index_entry_outside_the_model_directory_is_refused_the_same_way_for_both(kind, float_dir, quant_dir,
                                                                                      tmp_path, capsys):
    """The quantized index was read without the float index's check: '../' and absolute paths loaded."""
    d, index, shard = ((float_dir, FLOAT_INDEX, FLOAT_SHARD) if kind == "float"
                       else (quant_dir, QUANT_INDEX, QUANT_WEIGHTS))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(d / shard, elsewhere / shard)
    original = (d / index).read_text()
    for entry in (f"../../elsewhere/{shard}", str(elsewhere / shard)):
        assert (d / entry).is_file()  # the file it names exists and is a valid weight file
        (d / index).write_text(original)
        point_index(d / index, shard, entry)
        with pytest.raises(CheckpointError) as caught:
            load(d)
        message = str(caught.value)
        assert str(d / index) in message and entry in message and "inside the model directory only" in message
    assert main(["infer", "--model-path", str(d), "--max-new-tokens", "2", "hi"]) != 0
    assert f"{d / index} names weight files outside" in capsys.readouterr().err


def test_a_symlinked_shard_whose_target_is_a_regular_file_elsewhere_loads(float_dir, tiny_dir, tmp_path):
    """How the Hugging Face cache lays out a snapshot: each file a symlink to a blob outside it."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.move(float_dir / FLOAT_SHARD, blobs / "0123abcd")
    (float_dir / FLOAT_SHARD).symlink_to(blobs / "0123abcd")
    got = load(float_dir).model.state_dict()
    want = load(tiny_dir("gpt-neox-tiny")).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("target", ["fifo", "directory", "device"])
def test_a_weight_file_that_is_not_a_regular_file_is_refused_naming_it(float_dir, quant_dir, tmp_path, target):
    if target == "fifo":
        where = tmp_path / "pipe"
        os.mkfifo(where)
    elif target == "directory":
        where = tmp_path / "folder"
        where.mkdir()
    else:
        where = Path("/dev/zero")
    (float_dir / FLOAT_SHARD).unlink()
    (float_dir / FLOAT_SHARD).symlink_to(where)
    message = str(pytest.raises(CheckpointError, load, float_dir).value)
    assert f"{float_dir / FLOAT_SHARD} -> {where}" in message and "must be regular files" in message
    (quant_dir / QUANT_INDEX).unlink()  # the quantized files found by name, without an index
    (quant_dir / QUANT_WEIGHTS).unlink()
    (quant_dir / QUANT_WEIGHTS).symlink_to(where)
    message = str(pytest.raises(CheckpointError, load, quant_dir).value)
    assert f"{quant_dir / QUANT_WEIGHTS} -> {where}" in message and "must be regular files" in message


def test_the_readme_states_the_rule_the_loader_applies():
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert ("an index (`*.index.json`, float or quantized) may name only relative paths inside it (no `..`, no "
            "absolute path), and every weight file must be a regular file, which a symlink may point to wherever "
            "it lies") in text
    assert "Weights come from the model directory only" not in text
