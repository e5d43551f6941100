"""The cpu linear kernel on prepacked oneDNN weights (bf16): the same logits as aten's F.linear on every tiny
family, the packed tensor replaces the dense weight (held once, packed at load and not per call), the plain
kernel set unpacks it back to the same values, and fp32 models stay on aten."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from npuinfer.generate import seq_state
from npuinfer.backends.hf_model import HFBackend
from npuinfer.kernels import kernels_for, select_kernels
from npuinfer.model import Linear
from npuinfer.runtime import load_model

from conftest import model_loader

TINY = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
        "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]

pytestmark = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="oneDNN without bf16 on this cpu: the linear kernel leaves weights dense")


def linears(model) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


@torch.inference_mode()
def logits_of(model) -> list[torch.Tensor]:
    """Prefill of a left-padded batch, then two decode steps, at batch 3."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    state = seq_state(mask, 10)
    model.setup_caches(3, 10)
    out = [model(ids, 0, state)]
    for step in range(2):
        out.append(model(out[-1][:, -1].argmax(-1, keepdim=True), 7 + step, state))
    return [t.clone() for t in out]


@pytest.fixture(scope="module")
def bf16_models(npuinfer_cache):
    """Its own models (not a session-wide cache): these tests pack and unpack their weights."""
    return model_loader("bf16")


@pytest.mark.parametrize("name", TINY)
def test_packed_linear_gives_the_same_logits_as_aten(name, bf16_models):
    loaded = bf16_models(name)
    model, fused = loaded.model, loaded.kernels
    layers = linears(model)
    assert layers and all(m.weight.is_mkldnn for m in layers.values()), "every projection and the head packed"
    assert model.packed_linears == len(layers)
    assert any(c.op == "linear" and c.ok for c in fused.checks)  # self-checked against F.linear first
    packed = logits_of(model)
    try:
        model.use_kernels(fused.with_plain("linear"))  # everything else fused as before: only the linear differs
        assert model.packed_linears == 0 and not any(m.weight.is_mkldnn for m in layers.values())
        dense = logits_of(model)
    finally:
        model.use_kernels(fused)
    assert model.packed_linears == len(layers)
    for step, (a, b) in enumerate(zip(packed, dense)):
        # bit-identical on this machine (oneDNN's and aten's bf16 kernels accumulate in fp32 the same way);
        # a bf16 tolerance would be 1 ulp of the logits (~1e-2 here)
        assert torch.equal(a, b), f"step {step}: max diff {(a.float() - b.float()).abs().max()}"


def test_packed_weight_replaces_the_dense_one_and_is_packed_once(npuinfer_cache):
    loaded = load_model("qwen-tiny", device="cpu", dtype="bf16", kernels="plain")
    model = loaded.model
    layers = linears(model)
    assert model.packed_linears == 0
    values = {name: m.weight.detach().clone() for name, m in layers.items()}
    dense_refs = {name: weakref.ref(m.weight) for name, m in layers.items()}
    model.use_kernels(kernels_for(loaded.args, "cpu", torch.bfloat16, "fused"))
    gc.collect()
    assert all(m.weight.is_mkldnn for m in layers.values())
    alive = [name for name, ref in dense_refs.items() if ref() is not None]
    assert not alive, f"dense weights still held after packing: {alive}"  # memory not doubled
    for name, m in layers.items():
        assert m.weight.shape == values[name].shape and m.weight.dtype == torch.bfloat16
        assert torch.equal(m.weight.to_dense(), values[name]), name
    # packed at load, not per call: a forward leaves the same tensors in place
    held = {name: m.weight for name, m in layers.items()}
    logits_of(model)
    assert all(m.weight is held[name] for name, m in layers.items())
    # the plain kernel set puts dense weights back, bit for bit
    model.use_kernels(select_kernels("cpu", "plain"))
    assert model.packed_linears == 0
    for name, m in layers.items():
        assert not m.weight.is_mkldnn and torch.equal(m.weight, values[name]), name


def test_fp32_and_plain_models_keep_dense_weights(load_tiny, npuinfer_cache):
    assert load_tiny("qwen-tiny").model.packed_linears == 0  # fp32: aten's F.linear
    plain = load_model("qwen-tiny", device="cpu", dtype="bf16", kernels="plain")
    assert plain.model.packed_linears == 0 and plain.kernels.describe()["linear"] == "plain torch"


def test_head_tied_to_the_embedding_stays_dense(npuinfer_cache):
    loaded = load_model("qwen-tiny", device="cpu", dtype="bf16", kernels="plain")
    model = loaded.model
    model.output.weight = model.tok_embeddings.weight  # a tied head: packing it would hold the table twice
    model.use_kernels(kernels_for(loaded.args, "cpu", torch.bfloat16, "fused"))
    assert model.output.weight is model.tok_embeddings.weight and not model.output.weight.is_mkldnn
    assert model.layers[0].attention.wqkv.weight.is_mkldnn


def test_transformers_shares_a_packed_model_as_dense_weights(npuinfer_cache):
    """The packed model is unpacked in place (it runs on dense weights too), so transformers reads its tensors:
    one copy of the weights, never a dense copy beside the packed one (#29 item 13)."""
    loaded = load_model("qwen-tiny", device="cpu", dtype="bf16")  # its own: sharing unpacks it
    assert loaded.model.packed_linears > 0
    want = loaded.model.layers[0].feed_forward.w2.weight.to_dense()
    before = logits_of(loaded.model)
    backend = HFBackend.sharing(loaded)
    hf_state = backend.model.state_dict()
    assert not any(t.is_mkldnn for t in hf_state.values()) and loaded.model.packed_linears == 0
    assert torch.equal(hf_state["model.layers.0.mlp.down_proj.weight"], want)
    ours = {t.untyped_storage().data_ptr() for t in loaded.model.state_dict().values()}
    assert all(t.untyped_storage().data_ptr() in ours for t in hf_state.values())
    assert all(torch.equal(a, b) for a, b in zip(logits_of(loaded.model), before))  # npuinfer's model still runs


def test_c_eval_head_log_probabilities_read_a_packed_head(bf16_models):
    """Transformer.head_logprobs (C-Eval's head over gathered positions) on a packed head equals log_softmax of the
    head's logits; it splits a dense head by rows, which a oneDNN-blocked weight does not have."""
    model = bf16_models("qwen-tiny").model
    assert model.output.packed
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(9, model.args.dim, generator=gen) * 3).to(torch.bfloat16)
    rows = torch.randint(0, 9, (20,), generator=gen)
    tokens = torch.randint(0, model.args.vocab_size, (20,), generator=gen)
    with torch.inference_mode():
        got = model.head_logprobs(hidden, rows, tokens)
        dense = model.output.weight.to_dense()
        want = torch.nn.functional.linear(hidden, dense).float().log_softmax(-1)[rows, tokens]
    assert got.dtype == torch.float32 and got.shape == (20,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_bf16_checkpoint_keeps_no_file_mapped_but_the_embedding(tmp_path, npuinfer_cache):
    """Packing replaces each matrix read from a bf16 safetensors file; the norms and biases read from the same
    file are copies, so no file's mapping (and the pages packing read from it) outlives the load. Only the
    embedding table stays in its file: rows never looked up are never read. Before, a full-size Qwen-7B held
    its files beside the packed weights (22.5 GiB RSS for 14.4 GiB, issue 13)."""
    import shutil

    from safetensors.torch import save_file

    from npuinfer.checkpoint import read_weights
    from npuinfer.tiny import ensure_tiny
    from npuinfer.weight_files import is_file_memory

    source = ensure_tiny("qwen-tiny")
    directory = tmp_path / "qwen-bf16"
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors*", "*.bin*"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in read_weights(source).items()},
              str(directory / "model.safetensors"))
    loaded = load_model(model_path=directory, device="cpu", dtype="bf16")
    model = loaded.model
    assert model.packed_linears == len(linears(model))
    held = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None}
    assert any(t.dim() == 1 for t in held.values())  # the norms and biases this is about
    assert [n for n, t in held.items() if not t.is_mkldnn and is_file_memory(t)] == ["tok_embeddings.weight"]
