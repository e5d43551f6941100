"""Tensor parallelism on 2 real torch.distributed ranks (gloo, CPU): tp=2 equals tp=1 for every family.

One spawn of 2 processes loads all the tiny families (the grouped-query ones with 2 K/V heads, one per rank) and a
Llama written by transformers with a single K/V head (replicated to both ranks) through runtime.load_model (each
rank reads only its part_model folder) and runs a padded batch: prefill logits, 4 decode steps, greedy generations.
The single-process results are the reference. Then the CLI under torchrun, and a rank that dies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from npuinfer.generate import generate, seq_state
from npuinfer.kernels import select_kernels
from npuinfer.parallel.cut import cut_checkpoint
from npuinfer.parallel.layout import PART_DIR, TP_KEY
from npuinfer.parallel.launch import free_port, run_under_torchrun
from npuinfer.tiny import MARKER, ensure_tiny
from test_gqa_families import save_hf_checkpoint

TINY = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
        "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]
ONE_KV_HEAD = "llama-1kv"  # 4 query heads, 1 K/V head: tp 2 replicates it
AUTO_CUT = "gpt-neox-tiny"  # keeps the tiny marker and is not cut beforehand: the ranks cut it on first use
TP = 2
PROMPT, DECODE_STEPS, NEW_TOKENS = 7, 4, 8


@torch.inference_mode()
def scenario(model) -> dict:
    """Logits of a left-padded batch at prefill and each decode step, and greedy generations."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, PROMPT), generator=gen)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :3] = 0
    total = PROMPT + DECODE_STEPS + 1
    model.setup_caches(2, total)
    state = seq_state(mask, total)
    logits = [model(ids, 0, state)]
    for step in range(DECODE_STEPS):
        token = logits[-1][:, -1].argmax(-1, keepdim=True)
        logits.append(model(token, PROMPT + step, state))
    return {"logits": [t.clone() for t in logits],
            "padded": generate(model, ids, NEW_TOKENS, mask),
            "unpadded": generate(model, ids[:1], NEW_TOKENS)}


def layer_bytes(model) -> int:
    """Bytes of the tensors tensor parallelism splits (all but norms, embedding, head and row-parallel biases)."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if k.startswith("layers.") and "norm" not in k and not k.endswith(("wo.bias", "w2.bias")))


def _rank_main(rank: int, port: int, jobs: list[tuple[str, str]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(TP), RANK=str(rank),
                      LOCAL_RANK=str(rank), NPUINFER_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from npuinfer.parallel.dist import init_tensor_parallel, is_rank0, max_over_ranks
    from npuinfer.parallel.shard import shard_bytes
    from npuinfer.runtime import load_model

    device = init_tensor_parallel(TP, "cpu")
    results = {"is_rank0": is_rank0(), "max": max_over_ranks(rank + 0.5), "device": str(device)}
    for name, path in jobs:
        loaded = load_model(model_path=path, device=device, dtype="fp32")
        results[name] = {"run": scenario(loaded.model), "bytes": shard_bytes(loaded.model),
                         "layer_bytes": layer_bytes(loaded.model), "tp": (loaded.args.tp_size, loaded.args.tp_rank)}
        loaded.model.use_kernels(select_kernels("cpu", "plain"))  # the same shards through plain torch ops
        results[name]["plain"] = scenario(loaded.model)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def tp_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tp")
    dirs = {}
    for name in TINY:
        dirs[name] = base / name
        shutil.copytree(ensure_tiny(name), dirs[name])
        if name != AUTO_CUT:
            (dirs[name] / MARKER).unlink()
            cut_checkpoint(dirs[name], TP)
    dirs[ONE_KV_HEAD] = base / ONE_KV_HEAD
    save_hf_checkpoint("llama3", dirs[ONE_KV_HEAD], ensure_tiny, kv_heads=1)
    cut_checkpoint(dirs[ONE_KV_HEAD], TP)
    return dirs


@pytest.fixture(scope="module")
def runs(tp_dirs, tmp_path_factory):
    """(single-process reference per family, [rank 0 results, rank 1 results])."""
    from npuinfer.parallel.shard import shard_bytes
    from npuinfer.runtime import load_model

    reference = {}
    for name, path in tp_dirs.items():
        model = load_model(model_path=path, device="cpu", dtype="fp32").model  # one process: part_model ignored
        reference[name] = {"run": scenario(model), "bytes": shard_bytes(model), "layer_bytes": layer_bytes(model)}
    out = tmp_path_factory.mktemp("ranks")
    jobs = [(name, str(path)) for name, path in tp_dirs.items()]
    mp.spawn(_rank_main, args=(free_port(), jobs, str(out)), nprocs=TP, join=True)
    return reference, [torch.load(out / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("name", [*TINY, ONE_KV_HEAD])
def test_tp2_logits_equal_tp1(name, runs):
    reference, ranks = runs
    ref = reference[name]["run"]["logits"]
    for rank, results in enumerate(ranks):
        assert results[name]["tp"] == (TP, rank)
        got = results[name]["run"]["logits"]
        assert len(got) == 1 + DECODE_STEPS
        for step, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"rank {rank} step {step}: {m}")
    for a, b in zip(ranks[0][name]["run"]["logits"], ranks[1][name]["run"]["logits"]):
        assert torch.equal(a, b)  # the all-reduce leaves every rank with the same bits: same tokens everywhere


@pytest.mark.parametrize("name", [*TINY, ONE_KV_HEAD])
def test_tp2_greedy_generations_identical(name, runs):
    reference, ranks = runs
    for results in ranks:
        for kind in ("padded", "unpadded"):
            assert torch.equal(results[name]["run"][kind], reference[name]["run"][kind]), kind


@pytest.mark.parametrize("name", [*TINY, ONE_KV_HEAD])
def test_tp2_plain_kernels_equal_fused(name, runs):
    _, ranks = runs
    for rank, results in enumerate(ranks):
        fused, plain = results[name]["run"], results[name]["plain"]
        for step, (a, b) in enumerate(zip(fused["logits"], plain["logits"])):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"rank {rank} step {step}: {m}")
        for kind in ("padded", "unpadded"):
            assert torch.equal(fused[kind], plain[kind]), kind


@pytest.mark.parametrize("name", TINY)
def test_each_rank_holds_half_the_layer_weights(name, runs):
    reference, ranks = runs
    full = reference[name]
    for results in ranks:
        assert results[name]["layer_bytes"] * TP == full["layer_bytes"]
        replicated = full["bytes"] - full["layer_bytes"]  # embedding, head, norms, row-parallel biases
        assert results[name]["bytes"] == replicated + full["layer_bytes"] // TP
        # (tiny models: ratio 0.74-0.81, the replicated embedding and head being a large share of them)


def test_a_single_kv_head_is_replicated_to_both_ranks(runs):
    reference, ranks = runs
    full = reference[ONE_KV_HEAD]
    kv_bytes = 2 * 2 * 16 * 64 * 4  # K and V projections of one 16-wide head from 64 dims, fp32, 2 layers
    for results in ranks:  # each rank: half of everything else, all of K and V
        assert results[ONE_KV_HEAD]["layer_bytes"] == (full["layer_bytes"] - kv_bytes) // TP + kv_bytes


def test_rank_helpers_and_tiny_cut_on_first_use(runs, tp_dirs):
    _, ranks = runs
    assert [r["is_rank0"] for r in ranks] == [True, False]
    assert [r["max"] for r in ranks] == [1.5, 1.5]
    assert [r["device"] for r in ranks] == ["cpu", "cpu"]
    part = tp_dirs[AUTO_CUT] / PART_DIR
    assert sorted(p.name for p in part.iterdir()) == ["0", "1"]
    assert json.loads((part / "1" / "config.json").read_text())[TP_KEY]["tp_size"] == TP


# ------------------------------------------------------------------ the CLI under torchrun


def infer_argv(path: Path, *extra: str) -> list[str]:
    return ["infer", "--model-path", str(path), "--device", "cpu", "--dtype", "fp32", "--no-stop",
            "--max-new-tokens", "6", *extra, "The capital of France is", "苹果公司的CEO是"]


def test_torchrun_infer_prints_once_and_matches_one_process(tp_dirs, capfd):
    from npuinfer.cli import main

    assert main(infer_argv(tp_dirs["qwen-tiny"])) == 0
    single = capfd.readouterr().out
    assert len(single.splitlines()) == 2
    code = run_under_torchrun(TP, ["-m", "npuinfer", *infer_argv(tp_dirs["qwen-tiny"], "--tp", str(TP))],
                              env={"NPUINFER_DIST_TIMEOUT": "60"})
    out = capfd.readouterr()
    assert code == 0, out.err
    assert out.out == single  # only rank 0 prints, and it prints the same text


DIST_TIMEOUT_S = 300


def test_a_rank_that_dies_is_reported_and_nothing_hangs(tp_dirs, tmp_path, capfd):
    """Rank 1 fails to load (its folder is gone) while rank 0 loads and waits in the first all-reduce."""
    broken = tmp_path / "broken"
    shutil.copytree(tp_dirs["internlm-tiny"], broken)
    shutil.rmtree(broken / PART_DIR / "1")
    start = time.monotonic()
    code = run_under_torchrun(TP, ["-m", "npuinfer", *infer_argv(broken, "--tp", str(TP))],
                              env={"NPUINFER_DIST_TIMEOUT": str(DIST_TIMEOUT_S)})
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert code != 0
    # torchrun stops rank 0 as soon as rank 1 exits: the collective's timeout is never waited for. The bound is
    # that timeout itself (a run that waited for it takes longer), not a guess at how fast this machine is.
    assert elapsed < DIST_TIMEOUT_S, elapsed
    assert "rank 1 stderr" in err and "rank 1 of 2: " in err and "part_model/1 is missing" in err
    assert "npuinfer cut --model-path" in err
    kept = re.search(r"logs are kept in (\S+)", err)
    assert kept and Path(kept.group(1)).is_dir()
    shutil.rmtree(kept.group(1))
