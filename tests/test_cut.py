"""`npuinfer cut`: part_model/{rank} layout for every family, bad tp sizes, re-cuts, and the per-rank checks.

Single process: the shards are compared tensor by tensor with the full canonical checkpoint.
tests/test_parallel.py runs them on 2 ranks with torch.distributed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from npuinfer.checkpoint import CheckpointError, read_weights
from npuinfer.cli import main
from npuinfer.parallel.cut import CutError, cut_checkpoint, read_canonical, read_checkpoint_args
from npuinfer.parallel.layout import PART_DIR, TP_KEY
from npuinfer.parallel.dist import ParallelError, init_tensor_parallel
from npuinfer.parallel.shard import check_part
from npuinfer.tiny import MARKER, ensure_tiny, make_tiny

TINY = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
        "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]


def copy_of(name: str, dest: Path) -> Path:
    """A writable copy of a cached tiny checkpoint, without the tiny marker (so nothing is cut automatically)."""
    shutil.copytree(ensure_tiny(name), dest)
    (dest / MARKER).unlink()
    return dest


def hidden_leftovers(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.iterdir() if p.name.startswith(f".{PART_DIR}")]


@pytest.mark.parametrize("name", TINY)
def test_cut_splits_every_family(name, tmp_path):
    model_dir = copy_of(name, tmp_path / name)
    config, family, args = read_checkpoint_args(model_dir)
    full = read_canonical(model_dir, config, family, args)
    folders = cut_checkpoint(model_dir, 2)
    assert folders == [model_dir / PART_DIR / "0", model_dir / PART_DIR / "1"]
    assert hidden_leftovers(model_dir) == []

    parts = []
    for rank, folder in enumerate(folders):
        part_config = json.loads((folder / "config.json").read_text())
        meta = part_config.pop(TP_KEY)
        assert part_config == config  # the original fields, unchanged
        assert meta["tp_size"] == 2 and meta["rank"] == rank and meta["family"] == family
        assert meta["layout"] == "canonical" and meta["source_checkpoint"] and meta["source_digest"]
        parts.append(read_weights(folder))
        assert set(parts[-1]) == set(full)

    hd, local, local_kv = args.head_dim, args.n_heads // 2, args.n_kv_heads // 2
    for key, tensor in full.items():
        p0, p1 = parts[0][key], parts[1][key]
        assert p0.dtype == tensor.dtype
        if ".wqkv." in key:  # each of the Q, K and V blocks split by heads (K and V by their own, fewer, heads)
            q, k, v = tensor.split([args.n_heads * hd, args.n_kv_heads * hd, args.n_kv_heads * hd])
            for rank, part in enumerate((p0, p1)):
                mine = [q[rank * local * hd:(rank + 1) * local * hd],
                        *(t[rank * local_kv * hd:(rank + 1) * local_kv * hd] for t in (k, v))]
                assert torch.equal(part, torch.cat(mine))
        elif key.endswith(("w1.weight", "w1.bias", "w3.weight", "w3.bias")):
            assert torch.equal(torch.cat([p0, p1], dim=0), tensor) and p0.shape[0] == tensor.shape[0] // 2
        elif key.endswith(("wo.weight", "w2.weight")):
            assert torch.equal(torch.cat([p0, p1], dim=1), tensor) and p0.shape[1] == tensor.shape[1] // 2
        elif key.endswith(("wo.bias", "w2.bias")):  # added once: rank 0 holds it, the other ranks zeros
            assert torch.equal(p0, tensor) and not p1.any()
        else:  # norms, embedding, head
            assert torch.equal(p0, tensor) and torch.equal(p1, tensor), key

    split = sum(t.numel() for k, t in full.items() if k.endswith(
        ("wqkv.weight", "wqkv.bias", "w1.weight", "w1.bias", "w3.weight", "w3.bias", "wo.weight", "w2.weight")))
    total = sum(t.numel() for t in full.values())
    for part in parts:
        assert sum(t.numel() for t in part.values()) == total - split // 2


def test_norm_head_is_normalised_over_the_full_row(tmp_path):
    """Baichuan2: each rank's head rows are the checkpoint's lm_head rows L2-normalised over all of `dim`."""
    model_dir = copy_of("baichuan2-13b-tiny", tmp_path / "bc")
    raw_head = read_weights(model_dir)["lm_head.weight"].float()
    assert not torch.allclose(raw_head.norm(dim=-1), torch.ones(raw_head.shape[0]))  # the test means something
    for folder in cut_checkpoint(model_dir, 2):
        head = read_weights(folder)["output.weight"].float()
        assert head.shape == raw_head.shape
        torch.testing.assert_close(head, torch.nn.functional.normalize(raw_head, dim=-1))
        torch.testing.assert_close(head.norm(dim=-1), torch.ones(head.shape[0]))


@pytest.mark.parametrize("tp", [3, 8])
def test_tp_not_dividing_heads_writes_nothing(tp, tmp_path):
    model_dir = copy_of("qwen-tiny", tmp_path / "q")
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(CutError, match=f"tensor parallel size {tp} does not divide the attention heads 4"):
        cut_checkpoint(model_dir, tp)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_tp_not_dividing_intermediate_is_refused(tmp_path):
    model_dir = tmp_path / "m"
    make_tiny("internlm-tiny", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(num_attention_heads=8, intermediate_size=164)  # 8 heads of 8; 164 = 4 x 41
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CutError, match="does not divide the MLP width"):
        cut_checkpoint(model_dir, 8)
    assert not (model_dir / PART_DIR).exists() and hidden_leftovers(model_dir) == []


def test_recut_replaces_the_old_cut(tmp_path):
    model_dir = copy_of("gpt-neox-tiny", tmp_path / "n")
    cut_checkpoint(model_dir, 2)
    cut_checkpoint(model_dir, 4)
    assert sorted(p.name for p in (model_dir / PART_DIR).iterdir()) == ["0", "1", "2", "3"]
    assert json.loads((model_dir / PART_DIR / "1" / "config.json").read_text())[TP_KEY]["tp_size"] == 4
    assert hidden_leftovers(model_dir) == []


def test_recut_after_a_swap_killed_between_its_renames(tmp_path):
    # where the system cannot exchange two directories at once, the old cut is parked before the new one is
    # renamed in; a kill between the two leaves it parked, and the next cut puts it back before replacing it
    model_dir = copy_of("gpt-neox-tiny", tmp_path / "n")
    cut_checkpoint(model_dir, 2)
    (model_dir / PART_DIR).rename(model_dir / f".{PART_DIR}.previous")
    cut_checkpoint(model_dir, 4)
    assert sorted(p.name for p in (model_dir / PART_DIR).iterdir()) == ["0", "1", "2", "3"]
    assert hidden_leftovers(model_dir) == []


def test_large_ranks_are_written_as_indexed_files(tmp_path, monkeypatch):
    import npuinfer.parallel.cut as cut

    model_dir = copy_of("baichuan2-7b-tiny", tmp_path / "b")
    config, family, args = read_checkpoint_args(model_dir)
    full = read_canonical(model_dir, config, family, args)
    monkeypatch.setattr(cut, "MAX_FILE_BYTES", 100_000)
    folder = cut_checkpoint(model_dir, 2)[1]
    files = sorted(p.name for p in folder.glob("model*.safetensors"))
    assert len(files) > 2 and (folder / "model.safetensors.index.json").is_file()
    part = read_weights(folder)
    assert set(part) == set(full)
    assert torch.equal(part["layers.2.feed_forward.w2.weight"], full["layers.2.feed_forward.w2.weight"][:, 80:])


def test_failed_write_leaves_no_partial_cut(tmp_path, monkeypatch):
    import npuinfer.parallel.cut as cut

    model_dir = copy_of("qwen-tiny", tmp_path / "q")
    cut_checkpoint(model_dir, 2)
    old = (model_dir / PART_DIR / "0" / "config.json").read_text()

    def disk_full(state, out, label):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cut, "_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cut_checkpoint(model_dir, 4)
    assert (model_dir / PART_DIR / "0" / "config.json").read_text() == old  # the previous cut is intact
    assert hidden_leftovers(model_dir) == []


def test_cut_command(tmp_path, capsys):
    model_dir = copy_of("internlm-tiny", tmp_path / "i")
    assert main(["cut", "--model-path", str(model_dir), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cut {model_dir} for tensor parallel size 2: wrote ")
    assert str(model_dir / PART_DIR / "1") in out
    assert main(["cut", "--model-path", str(model_dir), "--tp", "3"]) == 1
    assert "tensor parallel size 3 does not divide" in capsys.readouterr().err
    assert main(["cut", "--model-path", str(model_dir / PART_DIR / "0"), "--tp", "2"]) == 1
    assert "is a tensor-parallel shard" in capsys.readouterr().err


# ------------------------------------------------------------------ what a rank checks before loading its folder


@pytest.fixture
def cut_qwen(tmp_path):
    model_dir = copy_of("qwen-tiny", tmp_path / "q")
    cut_checkpoint(model_dir, 2)
    return model_dir, json.loads((model_dir / "config.json").read_text())


def test_check_part_accepts_its_own_folder(cut_qwen):
    model_dir, config = cut_qwen
    assert check_part(model_dir, config, 2, 1) == model_dir / PART_DIR / "1"


def test_missing_part_model(tmp_path):
    model_dir = copy_of("qwen-tiny", tmp_path / "q")
    with pytest.raises(ParallelError, match=r"rank 0 of 2: .* has no part_model/.*npuinfer cut --model-path"):
        check_part(model_dir, json.loads((model_dir / "config.json").read_text()), 2, 0)


def test_missing_rank_folder(cut_qwen):
    model_dir, config = cut_qwen
    shutil.rmtree(model_dir / PART_DIR / "1")
    with pytest.raises(ParallelError, match=r"rank 1 of 2: .*part_model/1 is missing \(part_model/ holds ranks 0\)"):
        check_part(model_dir, config, 2, 1)


def test_cut_for_another_tp_size(cut_qwen):
    model_dir, config = cut_qwen
    cut_checkpoint(model_dir, 4)
    with pytest.raises(ParallelError, match="was cut for tensor parallel size 4, but this run has 2 ranks"):
        check_part(model_dir, config, 2, 0)


def test_cut_from_another_model(cut_qwen, tmp_path):
    model_dir, _ = cut_qwen
    other = copy_of("internlm-tiny", tmp_path / "other")
    shutil.copytree(model_dir / PART_DIR, other / PART_DIR)
    with pytest.raises(ParallelError, match="cut from another checkpoint .*config.json fields differ"):
        check_part(other, json.loads((other / "config.json").read_text()), 2, 0)


def test_cut_from_same_shape_other_weights(cut_qwen, tmp_path):
    """Same config and file sizes (a base and a chat model): the sampled content digest tells them apart."""
    model_dir, config = cut_qwen
    other = tmp_path / "other-seed"
    make_tiny("qwen-tiny", other, seed=1)
    (other / MARKER).unlink()
    shutil.copytree(model_dir / PART_DIR, other / PART_DIR)
    with pytest.raises(ParallelError, match="cut from another checkpoint .*source_digest"):
        check_part(other, json.loads((other / "config.json").read_text()), 2, 0)


def test_original_weights_removed_after_cut(cut_qwen):
    """A node given only config, tokenizer and part_model: the config fields are still checked."""
    model_dir, config = cut_qwen
    for path in model_dir.glob("model*.safetensors*"):
        path.unlink()
    assert check_part(model_dir, config, 2, 0) == model_dir / PART_DIR / "0"


def test_single_process_run_ignores_part_model_and_refuses_a_part_folder(cut_qwen):
    from npuinfer.runtime import load_model

    model_dir, _ = cut_qwen
    loaded = load_model(model_path=model_dir, device="cpu", dtype="fp32")
    assert loaded.args.tp_size == 1 and loaded.model.layers[0].attention.wqkv.weight.shape[0] == 3 * 64
    with pytest.raises(CheckpointError, match="is rank 0 of a tensor-parallel cut .*point --model-path at the dir"):
        load_model(model_path=model_dir / PART_DIR / "0", device="cpu", dtype="fp32")


def test_tp_needs_torchrun_with_matching_world_size(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_tensor_parallel(1, "cpu").type == "cpu"  # no group for one rank
    with pytest.raises(ParallelError, match="--tp 2 needs 2 processes.*torchrun --nproc-per-node 2"):
        init_tensor_parallel(2, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ParallelError, match=r"--tp 2 but torchrun started 4 processes"):
        init_tensor_parallel(2, "cpu")
