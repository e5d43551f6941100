"""W8 checkpoints under tensor parallelism on 2 real gloo ranks: `npuinfer cut` splits the int8 weights with
their per-channel scales, and tp=2 gives the logits of tp=1 for every family, W8A16 and W8A8."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from npuinfer.parallel.cut import cut_checkpoint
from npuinfer.parallel.launch import free_port

FAMILIES = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
            "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]
SCHEMES = ["W8A16", "W8A8"]
TP = 2


@torch.inference_mode()
def scenario(model) -> list[torch.Tensor]:
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2, 9)
    out = [model(ids, 0)]
    for step in range(2):
        out.append(model(out[-1][:, -1].argmax(-1, keepdim=True), 6 + step))
    return [t.clone() for t in out]


def _rank_main(rank: int, port: int, jobs: list[tuple[str, str]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(TP), RANK=str(rank),
                      LOCAL_RANK=str(rank), NPUINFER_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from npuinfer.parallel.dist import init_tensor_parallel
    from npuinfer.runtime import load_model

    device = init_tensor_parallel(TP, "cpu")
    results = {}
    for key, path in jobs:
        loaded = load_model(model_path=path, device=device, dtype="fp32")
        results[key] = {"logits": scenario(loaded.model), "quantization": loaded.quantization}
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from npuinfer.quantize import quantize_checkpoint
    from npuinfer.runtime import load_model

    base = tmp_path_factory.mktemp("quant_tp")
    jobs, reference = [], {}
    for name in FAMILIES:
        for scheme in SCHEMES:
            directory = base / f"{name}-{scheme}"
            quantize_checkpoint(tiny_dir(name), directory, scheme)
            cut_checkpoint(directory, TP)
            reference[f"{name}-{scheme}"] = scenario(load_model(model_path=directory, device="cpu", dtype="fp32").model)
            jobs.append((f"{name}-{scheme}", str(directory)))
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(free_port(), jobs, str(out)), nprocs=TP, join=True)
    return base, reference, [torch.load(out / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_tp2_equals_tp1(runs, name, scheme):
    _, reference, ranks = runs
    key = f"{name}-{scheme}"
    for rank, results in enumerate(ranks):
        assert results[key]["quantization"]["quantization"] == scheme
        for step, (a, b) in enumerate(zip(results[key]["logits"], reference[key])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"rank {rank} step {step}: {m}")


def test_cut_splits_scales_with_rows_and_replicates_activation_scales(runs):
    base, _, _ = runs
    full = load_file(str(base / "qwen-tiny-W8A8" / "quant_model_weight_w8a8.safetensors"))
    parts = [load_file(str(base / "qwen-tiny-W8A8" / "part_model" / str(r) / "model.safetensors")) for r in range(TP)]
    w1 = "layers.0.feed_forward.w1"  # Qwen's mlp.w2 (the gate): column parallel
    assert torch.equal(torch.cat([p[f"{w1}.deq_scale"] for p in parts]), full["transformer.h.0.mlp.w2.deq_scale"])
    assert torch.equal(torch.cat([p[f"{w1}.weight"] for p in parts]), full["transformer.h.0.mlp.w2.weight"])
    for p in parts:
        assert torch.equal(p[f"{w1}.input_scale"], full["transformer.h.0.mlp.w2.input_scale"])
    wo = "layers.0.attention.wo"  # row parallel: int32 partial sums of the ranks add up to the full quant_bias
    assert torch.equal(sum(p[f"{wo}.quant_bias"].long() for p in parts), full["transformer.h.0.attn.c_proj.quant_bias"].long())
    w16 = load_file(str(base / "gpt-neox-tiny-W8A16" / "part_model" / "1" / "model.safetensors"))
    assert w16["layers.0.attention.wqkv.weight_scale"].shape == (w16["layers.0.attention.wqkv.weight"].shape[0], 1)
