"""W8 quantization: quantized forward vs a fake-quant float reference, file round trips, bad files."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from npuinfer.checkpoint import CheckpointError, args_from_config, detect_family, read_config
from npuinfer.model import Transformer
from npuinfer.quant.layout import find_quant_files, quant_from_canonical, quant_to_canonical, read_quant_files
from npuinfer.quant.linear import plan_from_state
from npuinfer.quant.scheme import decode_deq_scale, fake_quantize_activation, w8a8_float_bias

FAMILIES = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
            "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]


def kernel(scheme: str) -> str:
    """The int8 kernel a cpu layer must run: W8A16 npuinfer's own GEMV where it is built (test_cpu_int8_gemv.py
    checks that it is wherever it can be), else torch's."""
    from npuinfer.kernels.cpu_extension import Unavailable, load
    from npuinfer.quant.kernels import CPU_GEMV

    if scheme == "W8A8":
        return "torch._int_mm"
    try:
        load()
    except Unavailable:
        return "torch._weight_int8pack_mm"
    return CPU_GEMV


@pytest.fixture(scope="session")
def quantized(tiny_dir, tmp_path_factory):
    """quantized(name, scheme) -> directory written by npuinfer quantize (once per session)."""
    from npuinfer.quantize import quantize_checkpoint

    made = {}

    def get(name: str, scheme: str, **kwargs) -> Path:
        key = (name, scheme, repr(sorted(kwargs.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("quant") / f"{name}-{scheme}"
            quantize_checkpoint(tiny_dir(name), out, scheme, **kwargs)
            made[key] = out
        return made[key]

    return get


def canonical_quantized(model_dir: Path):
    config = read_config(model_dir)
    family = detect_family(config)
    args = args_from_config(config, family)
    state, _ = quant_to_canonical(family, read_quant_files(find_quant_files(model_dir)), args)
    if "output.weight" not in state and config.get("tie_word_embeddings"):
        state["output.weight"] = state["tok_embeddings.weight"]
    return args, state


def fake_quant_reference(model_dir: Path) -> Transformer:
    """A plain float Transformer over the dequantized weights; W8A8 inputs go through an int8 round trip."""
    args, state = canonical_quantized(model_dir)
    plan = plan_from_state(state)
    ref = {k: v for k, v in state.items() if k.rpartition(".")[2] in ("weight", "bias")}
    for prefix, entry in plan.items():
        w = state[f"{prefix}.weight"].double()
        if entry.scheme == "W8A16":  # msModelSlim: (weight - weight_offset) * weight_scale
            ref[f"{prefix}.weight"] = (w - state[f"{prefix}.weight_offset"].double()) * state[f"{prefix}.weight_scale"].double()
        else:
            deq = decode_deq_scale(state[f"{prefix}.deq_scale"]).double()
            ref[f"{prefix}.weight"] = w * (deq / state[f"{prefix}.input_scale"].double())[:, None]
            ref[f"{prefix}.bias"] = w8a8_float_bias(state[f"{prefix}.quant_bias"], deq, state[f"{prefix}.weight"],
                                                    state[f"{prefix}.input_offset"]) + state.get(f"{prefix}.bias", 0)
    model = Transformer(args)
    model.load_state_dict({k: v.float() for k, v in ref.items()}, strict=False)
    for prefix, entry in plan.items():
        if entry.scheme == "W8A8":
            scale, offset = state[f"{prefix}.input_scale"], state[f"{prefix}.input_offset"]
            model.get_submodule(prefix).register_forward_pre_hook(
                lambda mod, inputs, s=scale, o=offset: (fake_quantize_activation(inputs[0], s, o),))
    return model.eval()


def logits(model, tokens):
    model.setup_caches(tokens.shape[0], tokens.shape[1])
    with torch.no_grad():
        return model(tokens, 0).float()


@pytest.mark.parametrize("scheme", ["W8A16", "W8A8"])
@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_forward_equals_fake_quant_reference(quantized, name, scheme):
    from npuinfer.runtime import load_model

    directory = quantized(name, scheme)
    loaded = load_model(model_path=directory, device="cpu", dtype="fp32")
    assert loaded.quantization["quantization"] == scheme
    assert loaded.quantization["quant_kernel"] == f"{scheme}: {kernel(scheme)}"  # the int8 kernel ran, no fallback
    tokens = torch.randint(0, loaded.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = fake_quant_reference(directory)
    if scheme == "W8A8":
        # Layer by layer on the same inputs: an activation a float rounding step away from an int8 boundary rounds
        # to either neighbour in the two models (seen on an AMD EPYC), so whole-model logits may differ by that.
        inputs = layer_inputs(loaded.model, tokens)
        for prefix, x in inputs.items():
            with torch.no_grad():
                got_layer = loaded.model.get_submodule(prefix)(x)
                want_layer = reference.get_submodule(prefix)(x)
            err = (got_layer - want_layer).abs().max() / want_layer.abs().max()
            assert err < 5e-4, f"{name} {scheme} {prefix}: relative error {err:.2e} vs the fake-quant reference"
        assert len(inputs) == len(plan_from_state(canonical_quantized(directory)[1]))
    got = logits(loaded.model, tokens)
    want = logits(reference, tokens)
    err = (got - want).abs().max() / want.abs().max()
    limit = 5e-4 if scheme == "W8A16" else 3e-2  # W8A8: boundary roundings, at most a few int8 steps of a logit
    assert err < limit, f"{name} {scheme}: relative logit error {err:.2e} vs the fake-quant reference"


def layer_inputs(model, tokens) -> dict[str, torch.Tensor]:
    """Each quantized linear's input in a forward of ``model``."""
    from npuinfer.quant.linear import QuantLinear

    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].clone()))
             for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    try:
        logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


BF16_FROM_MAPPED_FILE = """
import sys, torch
from safetensors.torch import load_file
from npuinfer.quant.layout import find_quant_files
from npuinfer.quant.linear import QuantLinear
from npuinfer.runtime import load_model
from npuinfer.weight_files import is_file_memory
directory = sys.argv[1]
int8 = [t for f in find_quant_files(__import__("pathlib").Path(directory)).weights for t in load_file(str(f)).values()
        if t.dtype == torch.int8]
print("misaligned in the file:", sum(t.data_ptr() % 16 != 0 for t in int8), "of", len(int8))
loaded = load_model(model_path=directory, device="cpu", dtype="bf16")
model = loaded.model
layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
assert layers and all(m.weight.data_ptr() % 64 == 0 and not is_file_memory(m.weight) for m in layers)
left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t is not None and is_file_memory(t)]
print("file memory left:", left)
tokens = torch.randint(0, loaded.args.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
model.setup_caches(4, 10)
with torch.no_grad():
    prefill = model(tokens, 0).float()
    step = model(tokens[:, :1], 9).float()
reference = load_model(model_path=directory, device="cpu", dtype="fp32")
reference.model.setup_caches(4, 10)
with torch.no_grad():
    want = reference.model(tokens, 0).float()
print("relative error:", float((prefill - want).abs().max() / want.abs().max()),
      loaded.quantization["quant_kernel"].removeprefix("W8A16: "))
assert torch.isfinite(step).all()
"""


def test_bf16_w8a16_read_from_a_mapped_file_runs_four_rows(quantized):
    """safetensors hands out tensors inside the file's mapping at 8-byte offsets; the cpu int8 kernel's bf16 path
    crashed on such a weight from 4 rows up (the full-size Qwen-7B W8A16 run died in its first prefill, issue 13).
    Run in a subprocess so a crash reads as this test failing; the file must hold misaligned int8 weights, or
    the test would prove nothing."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", BF16_FROM_MAPPED_FILE, str(quantized("qwen-tiny", "W8A16"))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stdout}\n{run.stderr[-3000:]}"
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines() if ":" in line)
    misaligned, _, total = lines["misaligned in the file"].split()
    assert int(misaligned) > 0, "the quantized file's int8 weights all happen to be aligned: the test proves nothing"
    assert set(eval(lines["file memory left"])) <= {"tok_embeddings.weight"}  # the int8 weights are copies too
    error, ran = lines["relative error"].strip().split(" ", 1)
    assert ran == kernel("W8A16") and float(error) < 3e-2  # the 36-row prefill through int8pack either way


def test_quantize_round_trips(quantized, tiny_dir):
    """Read back and written again, the file's tensors come out the same; the int8 weights dequantize to
    within half a step of the float weights."""
    from npuinfer.checkpoint import read_weights

    for name in ("internlm-tiny", "gpt-neox-tiny"):  # separate q/k/v, per-head fused qkv
        for scheme in ("W8A16", "W8A8"):
            directory = quantized(name, scheme)
            files = find_quant_files(directory)
            on_disk = read_quant_files(files)
            config = read_config(directory)
            family = detect_family(config)
            args = args_from_config(config, family)
            canonical, _ = quant_to_canonical(family, on_disk, args)
            again = quant_from_canonical(family, canonical, args)
            assert again.keys() == on_disk.keys()
            for key, tensor in on_disk.items():
                assert torch.equal(again[key], tensor), key
            description = json.loads(files.description.read_text())
            assert description["model_quant_type"] == scheme
            assert {k for k, v in description.items() if v == scheme} >= {k for k, t in on_disk.items()
                                                                          if t.dtype == torch.int8}
    float_state = read_weights(tiny_dir("qwen-tiny"))
    q = load_file(str(quantized("qwen-tiny", "W8A16") / "quant_model_weight_w8a16.safetensors"))
    name = "transformer.h.0.attn.c_attn"
    deq = q[f"{name}.weight"].float() * q[f"{name}.weight_scale"].float()
    assert ((deq - float_state[f"{name}.weight"].float()).abs() <= q[f"{name}.weight_scale"].float() / 2 + 1e-7).all()
    assert q[f"{name}.weight_scale"].shape == (q[f"{name}.weight"].shape[0], 1)
    assert "lm_head.weight" in q and q["lm_head.weight"].dtype != torch.int8  # the head is never quantized


def test_skip_layers_stay_float(quantized):
    directory = quantized("baichuan2-7b-tiny", "W8A8", skip_layers={0})
    q = load_file(str(directory / "quant_model_weight_w8a8.safetensors"))
    assert q["model.layers.0.self_attn.W_pack.weight"].is_floating_point()
    assert q["model.layers.1.self_attn.W_pack.weight"].dtype == torch.int8
    assert q["model.layers.1.self_attn.W_pack.deq_scale"].shape == q["model.layers.1.self_attn.W_pack.weight"].shape[:1]


def test_description_naming_a_missing_tensor_is_an_error(quantized, tmp_path):
    import shutil

    from npuinfer.runtime import load_model

    directory = tmp_path / "broken"
    shutil.copytree(quantized("qwen-tiny", "W8A16"), directory)
    path = directory / "quant_model_description_w8a16.json"
    description = json.loads(path.read_text())
    description["transformer.h.0.attn.c_attn.weight_zeropoint"] = "W8A16"
    path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=r"quant_model_description_w8a16.json: names tensors that "
                                              r"quant_model_weight_w8a16.safetensors does not hold: "
                                              r"transformer.h.0.attn.c_attn.weight_zeropoint"):
        load_model(model_path=directory, device="cpu", dtype="fp32")


def test_smoothing_keeps_the_float_maths(quantized):
    """SmoothQuant rescales norm and weights; the quantized model still matches its fake-quant reference."""
    directory = quantized("internlm-tiny", "W8A8", smooth_alpha=0.5)
    from npuinfer.runtime import load_model

    loaded = load_model(model_path=directory, device="cpu", dtype="fp32")
    tokens = torch.randint(0, loaded.args.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    want = logits(fake_quant_reference(directory), tokens)
    assert ((logits(loaded.model, tokens) - want).abs().max() / want.abs().max()) < 5e-4


def test_infer_cli_runs_a_quantized_directory(quantized, capsys):
    from npuinfer.cli import main

    directory = quantized("gpt-neox-tiny", "W8A8")
    assert main(["infer", "--model-path", str(directory), "--max-new-tokens", "3", "--no-stop", "hello"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_compare_pairs_a_float_run_with_its_quantized_copy(tmp_path):
    from npuinfer.reports.compare import Labels, compare_runs, to_markdown
    from npuinfer.results.performance import BATCH, INPUT, NEXT, OUTPUT

    for run, model, next_ms, quant in (("float", "qwen-7b", 100.0, "none"), ("w8a16", "qwen-7b-w8a16", 60.0, "W8A16")):
        (tmp_path / run).mkdir()
        (tmp_path / run / f"performance_{model}_cpu.csv").write_text(
            f"model,{BATCH},{INPUT},{OUTPUT},{NEXT},quantization,quant_kernel\n"
            f"{model},1,32,32,{next_ms},{quant},{'W8A16: torch._weight_int8pack_mm' if quant != 'none' else ''}\n")
    comparison = compare_runs(tmp_path / "w8a16", tmp_path / "float", Labels("W8A16", "float"))
    row = next(r for r in comparison.performance if r["metric"] == NEXT)
    assert row["W8A16/float (对比)"] == pytest.approx(0.6)
    assert "W8A16 (W8A16: torch._weight_int8pack_mm)" in to_markdown(comparison)


def _npy_layout(float_dir: Path, quant_dir: Path, out: Path) -> None:
    """The older ModelSlim layout: the float checkpoint plus .npy dicts keyed by layer name."""
    import shutil

    shutil.copytree(float_dir, out)
    (out / "npuinfer_tiny.json").unlink()
    tensors = read_quant_files(find_quant_files(quant_dir))
    dicts: dict[str, dict[str, np.ndarray]] = {}
    names = {"weight": "quant_weight"}
    for name, tensor in tensors.items():
        layer, _, param = name.rpartition(".")
        if f"{layer}.weight" in tensors and tensors[f"{layer}.weight"].dtype == torch.int8 and param != "bias":
            dicts.setdefault(names.get(param, param), {})[layer] = tensor.numpy()
    for stem, table in dicts.items():
        np.save(out / f"{stem}.npy", table, allow_pickle=True)  # what ModelSlim's calibrator.save writes


@pytest.mark.parametrize("scheme", ["W8A16", "W8A8"])
def test_modelslim_npy_dicts_load_like_the_mindie_layout(quantized, tiny_dir, tmp_path, scheme):
    from npuinfer.runtime import load_model

    directory = quantized("baichuan2-13b-tiny", scheme)
    _npy_layout(tiny_dir("baichuan2-13b-tiny"), directory, tmp_path / "npy")
    from_npy = load_model(model_path=tmp_path / "npy", device="cpu", dtype="fp32")
    from_mindie = load_model(model_path=directory, device="cpu", dtype="fp32")
    assert from_npy.quantization["quantization"] == scheme
    tokens = torch.randint(0, from_npy.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(from_npy.model, tokens), logits(from_mindie.model, tokens))


def test_checkpoint_identity_covers_the_npy_dicts(quantized, tiny_dir, tmp_path):
    """The .npy dicts override the float weights beside them: another calibration is another checkpoint."""
    from npuinfer.checkpoint import checkpoint_identity
    from npuinfer.quant.npy_dict import load_npy_dict

    _npy_layout(tiny_dir("baichuan2-13b-tiny"), quantized("baichuan2-13b-tiny", "W8A16"), tmp_path / "npy")
    before = checkpoint_identity(tmp_path / "npy")
    scales = load_npy_dict(tmp_path / "npy" / "weight_scale.npy")
    scales.popitem()
    np.save(tmp_path / "npy" / "weight_scale.npy", scales, allow_pickle=True)
    assert checkpoint_identity(tmp_path / "npy") != before


def test_packed_deq_scale_loads_and_a_wrong_integer_dtype_is_named(quantized, tmp_path):
    """MindIE's fp16 W8A8 files hold deq_scale as int64 (the fp32 bits): same model. An int64 quant_bias is not."""
    import shutil

    from safetensors.torch import save_file

    from npuinfer.runtime import load_model

    source = quantized("qwen-tiny", "W8A8")
    directory = tmp_path / "packed"
    shutil.copytree(source, directory)
    path = directory / "quant_model_weight_w8a8.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if n.endswith(".deq_scale")]:
        tensors[name] = tensors[name].float().view(torch.int32).to(torch.int64)
    save_file(tensors, str(path))
    tokens = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    packed = load_model(model_path=directory, device="cpu", dtype="fp32")
    plain = load_model(model_path=source, device="cpu", dtype="fp32")
    assert torch.equal(logits(packed.model, tokens), logits(plain.model, tokens))
    name = "transformer.h.1.mlp.c_proj.quant_bias"
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=rf"wrong dtype: {name} is int64, expected int32"):
        load_model(model_path=directory, device="cpu", dtype="fp32")


class _WouldRunCode:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")  # unpickling this creates the file


def test_npy_pickle_that_would_run_code_is_refused_and_not_run(tiny_dir, tmp_path):
    import shutil

    from npuinfer.quant.npy_dict import RefusedPickle
    from npuinfer.runtime import load_model

    victim = tmp_path / "pwned"
    directory = tmp_path / "model"
    shutil.copytree(tiny_dir("qwen-tiny"), directory)
    np.save(directory / "quant_weight.npy", {"transformer.h.0.attn.c_attn": _WouldRunCode(victim)}, allow_pickle=True)
    np.save(directory / "weight_scale.npy", {}, allow_pickle=True)
    with pytest.raises(RefusedPickle, match=r"quant_weight.npy: its pickle refers to \w+\.open"):
        load_model(model_path=directory, device="cpu", dtype="fp32")
    assert not victim.exists()
    # the same file through a plain unpickler would have run it: the test's payload is real
    with open(directory / "quant_weight.npy", "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        pickle.load(f)
    assert victim.exists()


def test_quantize_command(tmp_path, capsys):
    from npuinfer.cli import main

    out = tmp_path / "q"
    calib = tmp_path / "calib.txt"
    calib.write_text("hello world\n\nsecond prompt\n", encoding="utf-8")
    assert main(["quantize", "--model", "internlm-tiny", "--w8a8", "--out", str(out), "--calib-file", str(calib),
                 "--skip-layers", "1"]) == 0
    assert f"wrote {out} (W8A8" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("quant_model_*")) == ["quant_model_description_w8a8.json",
                                                                  "quant_model_weight_w8a8.safetensors"]
    assert not (out / "npuinfer_tiny.json").exists() and (out / "config.json").is_file()
    assert main(["quantize", "--model", "internlm-tiny", "--w8a16", "--out", str(out)]) == 1  # not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["quantize", "--model-path", str(out), "--w8a16", "--out", str(tmp_path / "again")]) == 1
    assert "is already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "internlm-tiny", "--w8a16", "--out", str(tmp_path / "x"), "--calib-file", "f"])


def test_hf_backend_refuses_a_quantized_checkpoint(quantized):
    """Loaded into transformers' float layers, int8 weights would run as their integer values."""
    from npuinfer.device import get_device
    from npuinfer.backends.hf_model import HFUnsupported, load_hf_model

    with pytest.raises(HFUnsupported, match="W8 quantized checkpoint.*--backend npuinfer"):
        load_hf_model(quantized("qwen-tiny", "W8A16"), get_device("cpu"), torch.float32)


def test_quantized_matmuls_are_ops_of_the_one_kernel_table(quantized, tmp_path):
    """--kernels plain reaches the quantized linears (dequantize-then-matmul), and a plugin's registration for a
    quantized matmul replaces npuinfer's, checked like it (a wrong one is passed over, named in the notes)."""
    from npuinfer.kernels import matmul_candidates, registration
    from npuinfer.quant import kernels as quant_kernels
    from npuinfer.runtime import load_model

    directory = quantized("qwen-tiny", "W8A8")
    plain = load_model(model_path=directory, device="cpu", dtype="fp32", kernels="plain")
    assert plain.quantization["quant_kernel"] == "W8A8: dequantize"
    fused = load_model(model_path=directory, device="cpu", dtype="fp32")
    assert fused.quantization["quant_kernel"] == "W8A8: torch._int_mm"
    tokens = torch.randint(0, plain.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    assert (logits(plain.model, tokens) - logits(fused.model, tokens)).abs().max() < 1e-3
    op = quant_kernels.OP["W8A8"]
    saved = registration._FUSED[(op, "cpu")]
    try:
        registration.register(op, "cpu", "a plugin's wrong matmul", lambda x, layer: quant_kernels.w8a8_int_mm(x, layer) * 3)
        assert matmul_candidates(op, "cpu")[0][0].name == "a plugin's wrong matmul"
        again = load_model(model_path=directory, device="cpu", dtype="fp32")
        assert again.quantization["quant_kernel"] == "W8A8: dequantize"
        assert "a plugin's wrong matmul" in str(again.quantization)
    finally:
        registration._FUSED[(op, "cpu")] = saved
