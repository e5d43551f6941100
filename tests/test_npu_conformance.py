"""npuinfer's torch_npu calls against torch_npu's own schemas, on cpu (no NPU here).

Each release's schemas (tests/data/torch_npu_schemas.json, from Ascend/op-plugin) are registered with
torch.library under a stand-in namespace whose bodies are npuinfer's plain references (npu_stand_in.py); the
npu kernel table, the quantized matmuls and the decode step then run through them by keyword exactly as on a
device, eagerly and under torch.compile(fullgraph=True). A call that does not bind to the schema, passes what
the op's documentation refuses, or does not trace fails here. Every release whose schemas differ is tested.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

import npuinfer
from npuinfer.generate import seq_state
from npuinfer.kernels import KernelShapes, check_kernels, select_kernels
from npuinfer.kernels import check as kernel_check
from npuinfer.model import DecodeSlot, ModelArgs, Transformer
from npuinfer.kernels import matmul_candidates
from npuinfer.quant import kernels as quant_kernels
from npuinfer.quant.linear import QuantLinear
from npuinfer.quant.scheme import W8A8, W8A16

import npu_stand_in

RELEASES = npu_stand_in.distinct_releases()
A2 = "Ascend910B3"  # Atlas A2: npu_rotary_mul's jit_compile=False kernels (B1SD, any even D) from 7.0.0
INFERENCE_CARD = "Ascend310P3"  # Atlas inference products (300I DUO): jit_compile=True, 11SD and D = 128 only
HALF = [torch.float16, torch.bfloat16]
SHAPES = KernelShapes(dim=64, heads=2, head_dim=64, rot_dim=64, intermediate=96, alibi=True)


@pytest.fixture(autouse=True)
def fresh_self_check(monkeypatch):
    """The self-check caches by kernel function, and dynamo by code: the same functions run against each
    release here."""
    monkeypatch.setattr(kernel_check, "_CHECKED", {})
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _has(release: str, op: str) -> bool:
    return op in npu_stand_in.releases()[release]["schemas"]


def test_the_schema_file_covers_every_op_npuinfer_calls():
    source = "".join(Path(npuinfer.__file__).parent.joinpath(p).read_text()
                     for p in ("kernels/npu.py", "quant/kernels.py"))
    called = set(re.findall(r'"(npu_\w+)"', source))
    assert called >= {"npu_rms_norm", "npu_fused_infer_attention_score", "npu_quant_matmul"}
    releases = npu_stand_in.releases()
    assert {"6.0.rc2", "7.0.0", "26.0.0"} <= set(releases) and len(RELEASES) >= 5
    for name, release in releases.items():
        assert re.fullmatch(r"[0-9a-f]{40}", release["commit"]), name
        missing = called - set(release["schemas"])
        assert missing <= {"npu_fused_infer_attention_score"}, (name, missing)  # attention: from 6.0.rc3


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("release", RELEASES)
def test_npu_kernel_table_binds_to_each_release_and_matches_plain(release, dtype):
    npu_stand_in.CALLS.clear()
    with npu_stand_in.use(release, A2):
        kernels = check_kernels(select_kernels("npu"), SHAPES, "cpu", dtype)
    assert kernels.checks and all(c.ok for c in kernels.checks), [c.describe() for c in kernels.checks]
    names = kernels.describe()
    assert names["rms_norm"] == "torch_npu.npu_rms_norm" and names["gated_mlp"] == "torch_npu.npu_swiglu"
    assert names["rope"] == "torch_npu.npu_rotary_mul"
    if _has(release, "npu_fused_infer_attention_score"):  # the cheaper forms passed their self-check
        assert "sparse_mode 3" in names["prefill_attention"] and "whole cache" in names["decode_attention"]
        assert kernels.fallbacks == ()
        assert npu_stand_in.CALLS["attention sparse_mode=3"] and npu_stand_in.CALLS[
            "attention sparse_mode=0, actual_seq_lengths_kv"]
    else:
        assert names["prefill_attention"] == names["decode_attention"] == "plain torch"
        assert "this torch_npu has no npu_fused_infer_attention_score" in kernels.check_summary()
    cases = {(c.op, c.case) for c in kernels.checks}
    assert ("rope", "per-row positions") in cases


@pytest.mark.parametrize("release", ["7.0.0", "26.0.0"])
def test_what_an_op_cannot_serve_runs_plain_and_the_kernel_column_says_so(release):
    with npu_stand_in.use(release, INFERENCE_CARD):
        full = check_kernels(select_kernels("npu"), KernelShapes(64, 2, 128, 128, 96), "cpu", torch.float16)
        partial = check_kernels(select_kernels("npu"), KernelShapes(64, 2, 128, 32, 96), "cpu", torch.float16)
    with npu_stand_in.use(release, A2):
        fp32 = check_kernels(select_kernels("npu"), SHAPES, "cpu", torch.float32)
        a2_partial = check_kernels(select_kernels("npu"), KernelShapes(64, 2, 128, 32, 96), "cpu", torch.float16)
    # Atlas A2 takes the rotary slice (D 32) and per-row positions: fused, checked, no fallback
    assert a2_partial.describe()["rope"] == "torch_npu.npu_rotary_mul" and a2_partial.fallbacks == ()
    assert all(c.ok for c in a2_partial.checks)
    # D = 128, whole rotary: the op serves shared positions; padded rows' per-row positions run plain
    assert full.describe()["rope"] == "torch_npu.npu_rotary_mul" and all(c.ok for c in full.checks)
    assert "rope: plain torch for per-row positions (padded rows)" in full.check_summary()
    assert partial.describe()["rope"] == "plain torch"
    assert "npu_rotary_mul on Ascend310P3 takes D 128 only, the model rotates 32 of 128" in partial.check_summary()
    assert fp32.describe()["prefill_attention"] == fp32.describe()["decode_attention"] == "plain torch"
    assert "fp16 / bf16 only, the model runs float32" in fp32.check_summary()
    assert fp32.describe()["rms_norm"] == "torch_npu.npu_rms_norm"


def test_a_cheaper_attention_form_that_fails_its_check_gives_way_to_the_full_mask(monkeypatch):
    full = npu_stand_in.BODIES["npu_fused_infer_attention_score"]

    def without_sparse_mode_3(a, product):  # a build of the op that mishandles the compressed causal mask
        out, lse = full(a, product)
        return (out * 0 if a["sparse_mode"] == 3 else out), lse

    monkeypatch.setitem(npu_stand_in.BODIES, "npu_fused_infer_attention_score", without_sparse_mode_3)
    with npu_stand_in.use("26.0.0", A2):
        kernels = check_kernels(select_kernels("npu"), SHAPES, "cpu", torch.float16)
    assert all(c.ok for c in kernels.checks)
    assert kernels.describe()["prefill_attention"] == "torch_npu.npu_fused_infer_attention_score (full mask)"
    assert "whole cache" in kernels.describe()["decode_attention"]
    summary = kernels.check_summary()
    assert ("prefill_attention: torch_npu.npu_fused_infer_attention_score (full mask), as "
            "torch_npu.npu_fused_infer_attention_score (causal: sparse_mode 3) failed its self-check (causal: max abs "
            in summary), summary


def _quant_layer(scheme: str, dtype: torch.dtype, k: int = 64, n: int = 48) -> QuantLinear:
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear(k, n, scheme, bias=False)
    layer.weight.copy_(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8))
    if scheme == W8A16:
        layer.weight_scale.copy_(torch.rand(n, 1, generator=gen) * 0.01 + 0.001)
        layer.weight_offset.copy_(torch.randint(-3, 4, (n, 1), generator=gen).float())
    else:
        layer.input_scale.fill_(0.02)
        layer.input_offset.fill_(1.0)
        layer.quant_bias.copy_(torch.randint(-500, 500, (n,), generator=gen, dtype=torch.int32))
        deq = torch.rand(n, generator=gen) * 1e-4 + 1e-5
        # MindIE's layout: int64-packed for fp16 models, fp32 for bf16
        layer.deq_scale = deq.view(torch.int32).to(torch.int64) if dtype == torch.float16 else deq
    return layer


@pytest.mark.parametrize("scheme", [W8A16, W8A8])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("release", RELEASES)
def test_quantized_matmuls_bind_to_each_release(release, dtype, scheme):
    layer = _quant_layer(scheme, dtype)
    with npu_stand_in.use(release, A2):
        skipped = layer.prepare("npu", dtype)  # probes at 1, 4, 5, 17 and 33 rows against dequantize-then-matmul
        assert skipped == [] and layer.kernel_name.startswith("torch_npu."), skipped
        kernel = matmul_candidates(quant_kernels.OP[scheme], "npu")[0][0].fn
        compiled = torch.compile(lambda x: kernel(x, layer), fullgraph=True, backend="aot_eager")
        for rows in (1, 17, 33):
            x = torch.randn(rows, 64, dtype=dtype) * (0.02 * 20 if scheme == W8A8 else 1)
            expected = quant_kernels.FALLBACK[scheme](x, layer).float()
            got = compiled(x).float()
            assert (got - expected).abs().max() <= 3e-2 * expected.abs().max(), rows


def _tiny(position: str, dtype: torch.dtype) -> Transformer:
    args = ModelArgs("stand-in", vocab_size=96, dim=128, n_layers=2, n_heads=2, head_dim=64, intermediate_size=96,
                     max_seq_len=32, position=position)
    torch.manual_seed(0)
    model = Transformer(args).to(dtype).eval()
    for layer in model.layers:  # non-trivial norm weights, so a misplaced gamma shows
        layer.attention_norm.weight.data.uniform_(0.5, 1.5)
    return model


def _decode(model: Transformer, step, steps: int = 3) -> list[torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])  # row 0 left-padded
    mask = (ids != 0).long()
    total = ids.shape[1] + steps
    model.setup_caches(2, total + 3)  # a cache longer than the run, as one kept from a longer run
    state = seq_state(mask, total)
    logits = [model(ids, 0, state)[:, -1]]
    slots = torch.arange(total)
    for i in range(steps):
        token = logits[-1].argmax(-1).view(2, 1)
        logits.append(step(token, DecodeSlot(slots[ids.shape[1] + i:ids.shape[1] + i + 1], total), state))
    return logits


WITH_ATTENTION = [r for r in RELEASES if _has(r, "npu_fused_infer_attention_score")]


# RoPE on every release (6.0.rc2: attention plain, the rest fused); ALiBi (pse_shift) on the first and the last
# schema of the attention op
@pytest.mark.parametrize("release, position", [(r, "rope") for r in RELEASES]
                         + [(WITH_ATTENTION[0], "alibi"), (WITH_ATTENTION[-1], "alibi")])
def test_decode_graph_runs_through_each_release_also_compiled(release, position):
    dtype = torch.bfloat16
    plain = _tiny(position, dtype)
    plain.use_kernels(select_kernels("cpu", "plain"))
    model = _tiny(position, dtype)
    with npu_stand_in.use(release, A2), torch.no_grad():
        model.use_kernels(check_kernels(select_kernels("npu"), KernelShapes.from_args(model.args), "cpu", dtype))
        attention = _has(release, "npu_fused_infer_attention_score")
        assert model.kernels.is_fused("decode_attention") == attention
        assert model.kernels.fallbacks == (() if attention else tuple(
            f"{op}: plain torch (this torch_npu has no npu_fused_infer_attention_score)"
            for op in ("prefill_attention", "decode_attention")))
        expected = _decode(plain, plain.forward_slot)
        eager = _decode(model, model.forward_slot)
        cached = _decode(model, lambda token, slot, state: model(token, int(slot.pos), state)[:, -1])
        compiled = torch.compile(model.forward_slot, fullgraph=True, backend="aot_eager")
        in_graph = Counter()

        def compiled_step(token, slot, state):
            npu_stand_in.CALLS.clear()
            out = compiled(token, slot, state)
            in_graph.update(npu_stand_in.CALLS)
            return out

        traced = _decode(model, compiled_step)
    ops = {"npu_rms_norm", "npu_add_rms_norm", "npu_swiglu"}
    ops |= {"npu_rotary_mul"} if position == "rope" else set()
    ops |= {"npu_fused_infer_attention_score"} if attention else set()
    assert ops <= set(in_graph), in_graph  # the compiled step ran torch_npu's ops
    if attention:
        assert in_graph["attention sparse_mode=0, actual_seq_lengths_kv"] > 0, in_graph  # over the whole cache
    for got in (eager, cached, traced):
        for step, (a, b) in enumerate(zip(expected, got)):
            assert (a.float() - b.float()).abs().max() < 0.1, (step, (a.float() - b.float()).abs().max())
            assert torch.equal(a.argmax(-1), b.argmax(-1)), step
