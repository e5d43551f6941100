"""Bad input: every error names what is wrong (file, tensor, field, option) and how to fix it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from npuinfer.checkpoint import CheckpointError
from npuinfer.device import Device, DeviceError, get_device, parse_dtype
from npuinfer.generate import generate
from npuinfer.registry import ModelNotFound
from npuinfer.runtime import load_model


@pytest.fixture
def copy_tiny(tiny_dir, tmp_path):
    """copy_tiny(name) -> a private copy of a tiny checkpoint that the test may break."""

    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_dir(name), dst)
        return dst

    return make


def load(path, name=None, **kw):
    return load_model(name, model_path=path, device="cpu", dtype="fp32", **kw)


def error_of(fn, exc=Exception) -> str:
    with pytest.raises(exc) as info:
        fn()
    return str(info.value)


# ------------------------------------------------------------------ directories and files


def test_missing_directory(tmp_path):
    where = tmp_path / "nope"
    for name in (None, "internlm-tiny", "internlm-7b"):
        msg = error_of(lambda: load(where, name), CheckpointError)
        assert str(where) in msg and "does not exist" in msg


def test_missing_config_json(copy_tiny):
    d = copy_tiny("internlm-tiny")
    (d / "config.json").unlink()
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(d / "config.json") in msg and "not found" in msg


def test_config_json_not_json(copy_tiny):
    d = copy_tiny("qwen-tiny")
    (d / "config.json").write_text("{ not json")
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(d / "config.json") in msg and "not valid JSON" in msg


def test_missing_shard_named_by_index(copy_tiny):
    d = copy_tiny("internlm-tiny")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    msg = error_of(lambda: load(d), CheckpointError)
    assert "pytorch_model.bin.index.json" in msg and "pytorch_model-00002-of-00002.bin" in msg and "missing" in msg


def test_no_weights_at_all(copy_tiny):
    d = copy_tiny("gpt-neox-tiny")
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    msg = error_of(lambda: load(d), CheckpointError)
    assert "no weights found" in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg


@pytest.mark.parametrize("cut", ["half", "inside-header"])
def test_truncated_safetensors_names_the_file(copy_tiny, cut):
    d = copy_tiny("gpt-neox-tiny")
    f = d / "model-00002-of-00002.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if cut == "half" else data[:5])
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(f) in msg and "truncated or corrupt" in msg


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty"])
def test_truncated_or_corrupt_bin_names_the_file(copy_tiny, content):
    d = copy_tiny("internlm-tiny")
    f = d / "pytorch_model-00001-of-00002.bin"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x02garbage" * 50, "empty": b""}[content])
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(f) in msg and "corrupt" in msg
    assert "weights_only` set to `False`" not in msg  # never advise turning the safety off


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_bin_with_code_is_refused_not_run(copy_tiny, tmp_path, zipped):
    d = copy_tiny("internlm-tiny")
    f = d / "pytorch_model-00001-of-00002.bin"
    marker = tmp_path / "code_ran"
    torch.save({"model.embed_tokens.weight": _RunsCode(str(marker))}, f, _use_new_zipfile_serialization=zipped)
    msg = error_of(lambda: load(d), CheckpointError)
    assert not marker.exists()
    assert str(f) in msg and "refused" in msg and f"{os.system.__module__}.system" in msg


def test_bin_that_is_not_a_dict_of_tensors(copy_tiny):
    d = copy_tiny("internlm-tiny")
    f = d / "pytorch_model-00001-of-00002.bin"
    torch.save({"model.embed_tokens.weight": [1, 2, 3]}, f)
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(f) in msg and "dict of tensor name -> tensor" in msg


def test_legacy_non_zip_bin_still_loads(copy_tiny, load_tiny):
    """Files written by torch.save(_use_new_zipfile_serialization=False) cannot be mmapped; they load anyway."""
    d = copy_tiny("internlm-tiny")
    for f in d.glob("pytorch_model-*.bin"):
        torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    legacy, reference = load(d).model, load_tiny("internlm-tiny").model
    for name, tensor in reference.state_dict().items():
        assert torch.equal(legacy.state_dict()[name], tensor), name


# ------------------------------------------------------------------ tensors


def _edit_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _edit_bin(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_and_misshaped_tensors_are_listed_with_shapes(copy_tiny):
    d = copy_tiny("gpt-neox-tiny")

    def edit(state):
        del state["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"]
        state["gpt_neox.final_layer_norm.weight"] = torch.ones(65)

    _edit_safetensors(d / "model-00002-of-00002.safetensors", edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(d) in msg
    # named as the checkpoint names them, with the shape the config implies
    assert "missing: gpt_neox.layers.2.mlp.dense_h_to_4h.weight (256, 64)" in msg
    assert "gpt_neox.final_layer_norm.weight is (65,), expected (64,)" in msg


def test_unexpected_tensors_are_listed_with_shapes(copy_tiny):
    d = copy_tiny("qwen-tiny")

    def edit(state):
        state["transformer.h.2.attn.rotary.extra"] = torch.zeros(3, 4)

    _edit_safetensors(d / "model-00002-of-00002.safetensors", edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert "unexpected" in msg and "transformer.h.2.attn.rotary.extra (3, 4)" in msg


def test_misshaped_fused_qkv_is_named(copy_tiny):
    d = copy_tiny("gpt-neox-tiny")

    def edit(state):
        state["gpt_neox.layers.2.attention.query_key_value.weight"] = torch.zeros(190, 64)

    _edit_safetensors(d / "model-00002-of-00002.safetensors", edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert "gpt_neox.layers.2.attention.query_key_value.weight is (190, 64), expected (192, 64)" in msg


def test_misshaped_w_pack_is_named(copy_tiny):
    d = copy_tiny("baichuan2-7b-tiny")

    def edit(state):
        state["model.layers.2.self_attn.W_pack.weight"] = torch.zeros(192, 60)

    _edit_bin(d / "pytorch_model-00002-of-00002.bin", edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert "model.layers.2.self_attn.W_pack.weight is (192, 60), expected (192, 64)" in msg


def test_internlm_missing_one_projection_is_named(copy_tiny):
    d = copy_tiny("internlm-tiny")
    _edit_bin(d / "pytorch_model-00002-of-00002.bin", lambda s: s.pop("model.layers.2.self_attn.k_proj.weight"))
    msg = error_of(lambda: load(d), CheckpointError)
    assert "model.layers.2.self_attn.k_proj.weight (64, 64)" in msg and "missing" in msg
    assert "q_proj" not in msg  # the present projections are not blamed


@pytest.mark.parametrize("shape", [(64, 32), (60, 64)])
def test_internlm_misshaped_projection_is_named(copy_tiny, shape):
    d = copy_tiny("internlm-tiny")

    def edit(state):
        state["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(shape)

    _edit_bin(d / "pytorch_model-00002-of-00002.bin", edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert f"model.layers.2.self_attn.k_proj.weight is {shape}, expected (64, 64)" in msg


def test_whole_missing_internlm_attention_is_named_by_its_projections(copy_tiny):
    d = copy_tiny("internlm-tiny")

    def edit(state):
        for p in "qkv":
            del state[f"model.layers.2.self_attn.{p}_proj.bias"]

    _edit_bin(d / "pytorch_model-00002-of-00002.bin", edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert "missing: model.layers.2.self_attn.{q,k,v}_proj.bias (192,)" in msg


# ------------------------------------------------------------------ names, configs, dtypes, devices


def test_config_of_another_family_contradicts_the_name(tiny_dir):
    neox = tiny_dir("gpt-neox-tiny")
    msg = error_of(lambda: load(neox, "internlm-7b"), CheckpointError)
    assert str(neox / "config.json") in msg and "gpt-neox" in msg and "internlm-7b" in msg


def test_config_of_another_size_contradicts_the_name(tiny_dir):
    msg = error_of(lambda: load(tiny_dir("internlm-tiny"), "internlm-7b"), CheckpointError)
    assert "does not describe internlm-7b" in msg
    assert "hidden_size: expected 4096, found 64" in msg and "num_hidden_layers: expected 32, found 3" in msg


def test_rope_config_contradicts_an_alibi_name(tiny_dir):
    # baichuan2-7b-tiny and baichuan2-13b-tiny have equal sizes: only the position encoding tells them apart
    msg = error_of(lambda: load(tiny_dir("baichuan2-7b-tiny"), "baichuan2-13b-tiny"), CheckpointError)
    assert "does not describe baichuan2-13b-tiny" in msg and "position: expected alibi, found rope" in msg
    msg = error_of(lambda: load(tiny_dir("baichuan2-13b-tiny"), "baichuan2-7b-tiny"), CheckpointError)
    assert "position: expected rope, found alibi" in msg


def test_unknown_model_lists_known_ones():
    msg = error_of(lambda: load_model("llama-99b", device="cpu"), ModelNotFound)
    assert "llama-99b" in msg
    for name in ("qwen-7b", "qwen-14b", "baichuan2-7b", "baichuan2-13b", "internlm-7b", "gpt-neox-20b",
                 "qwen-tiny", "baichuan2-13b-tiny", "gpt-neox-tiny"):
        assert name in msg


@pytest.mark.parametrize("models_dir", [None, "set"])
def test_real_name_without_path_says_both_ways(monkeypatch, tmp_path, models_dir):
    if models_dir:
        monkeypatch.setenv("NPUINFER_MODELS_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("NPUINFER_MODELS_DIR", raising=False)
    msg = error_of(lambda: load_model("baichuan2-13b", device="cpu"), ModelNotFound)
    assert "--model-path" in msg and "NPUINFER_MODELS_DIR" in msg and "baichuan2-13b-tiny" in msg
    if models_dir:
        assert str(tmp_path / "baichuan2-13b") in msg


def test_real_name_found_under_models_dir(monkeypatch, tmp_path, tiny_dir):
    # the lookup works (it then fails on the size check, which proves it read that directory's config)
    shutil.copytree(tiny_dir("internlm-tiny"), tmp_path / "internlm-7b")
    monkeypatch.setenv("NPUINFER_MODELS_DIR", str(tmp_path))
    msg = error_of(lambda: load_model("internlm-7b", device="cpu"), CheckpointError)
    assert str(tmp_path / "internlm-7b" / "config.json") in msg and "does not describe internlm-7b" in msg


def test_unsupported_dtype_name():
    msg = error_of(lambda: parse_dtype("fp8"), ValueError)
    assert "'fp8'" in msg and "fp32" in msg and "fp16" in msg and "bf16" in msg
    msg = error_of(lambda: load_model("internlm-tiny", device="cpu", dtype="fp8"), ValueError)
    assert "'fp8'" in msg


def test_dtype_unsupported_on_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))  # Volta: bf16 only emulated
    monkeypatch.setattr(torch.version, "hip", None)
    msg = error_of(lambda: Device("cuda", 0).check_dtype(torch.bfloat16), DeviceError)
    assert "bf16" in msg and "cuda:0" in msg


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
@pytest.mark.parametrize("spec", ["npu", "npu:1"])
def test_npu_without_torch_npu_quotes_the_import_failure(spec):
    msg = error_of(lambda: get_device(spec), DeviceError)
    assert f"--device {spec}" in msg and "torch_npu could not be imported" in msg
    assert "No module named 'torch_npu'" in msg


def test_npu_static_tls_failure_gives_the_libgomp_hint(monkeypatch):
    from npuinfer import device

    real = device.importlib.import_module

    def fake(name, *a, **k):
        if name == "torch_npu":
            raise ImportError("libgomp-d22c30c5.so.1.0.0: cannot allocate memory in static TLS block")
        return real(name, *a, **k)

    monkeypatch.setattr(device.importlib, "import_module", fake)
    device._import_torch_npu.cache_clear()
    try:
        msg = error_of(lambda: get_device("npu:0"), DeviceError)
    finally:
        device._import_torch_npu.cache_clear()
    assert "cannot allocate memory in static TLS block" in msg and "LD_PRELOAD" in msg and "libgomp" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_on_a_machine_without_one():
    msg = error_of(lambda: get_device("cuda:0"), DeviceError)
    assert "--device cuda:0" in msg and "CUDA is not available" in msg


def test_device_spelling():
    msg = error_of(lambda: get_device("tpu"), ValueError)
    assert "'tpu'" in msg and "npu[:N]" in msg


# ------------------------------------------------------------------ the KV cache limit


def test_prompt_longer_than_kv_cache(tiny_dir):
    loaded = load(tiny_dir("internlm-tiny"), "internlm-tiny", max_seq_len=8)
    assert loaded.args.max_seq_len == 8
    assert generate(loaded.model, torch.tensor([[5] * 5]), 3).shape == (1, 3)  # exactly fits
    msg = error_of(lambda: generate(loaded.model, torch.tensor([[5] * 10]), 1), ValueError)
    assert "11 tokens" in msg and "KV cache limit of 8" in msg and "MAX_SEQ_LEN" in msg and "--max-seq-len" in msg


def test_max_seq_len_from_environment(tiny_dir, monkeypatch):
    monkeypatch.setenv("MAX_SEQ_LEN", "12")
    loaded = load(tiny_dir("qwen-tiny"))
    assert loaded.args.max_seq_len == 12
    msg = error_of(lambda: generate(loaded.model, torch.tensor([[5] * 12]), 2), ValueError)
    assert "KV cache limit of 12" in msg
    # an explicit --max-seq-len wins over the environment
    assert load(tiny_dir("qwen-tiny"), max_seq_len=20).args.max_seq_len == 20
    monkeypatch.setenv("MAX_SEQ_LEN", "twelve")
    msg = error_of(lambda: load(tiny_dir("qwen-tiny")), ValueError)
    assert "MAX_SEQ_LEN" in msg and "'twelve'" in msg


# ------------------------------------------------------------------ never run code from the model directory

_NO_CODE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    dirs = [Path(p).resolve() for p in sys.argv[1:]]
    opened = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = str(args[0] if isinstance(args[0], str) else args[0].decode())
            if path.endswith(".py") and any(str(d) in path for d in dirs):
                opened.append(path)

    sys.addaudithook(audit)
    import transformers.dynamic_module_utils as dmu

    def forbidden(*a, **k):
        raise AssertionError("transformers remote code machinery was used")

    dmu.get_class_from_dynamic_module = dmu.resolve_trust_remote_code = dmu.get_cached_module_file = forbidden
    from npuinfer.runtime import load_model
    for d in dirs:
        load_model(model_path=d, device="cpu", dtype="fp32")
    from_dirs = [m for m, mod in list(sys.modules.items())
                 if any(str(d) in str(getattr(mod, "__file__", "") or "") for d in dirs)]
    remote = [m for m in sys.modules if m.startswith("transformers_modules")
              or m.split(".")[-1].startswith(("modeling_", "configuration_", "tokenization_"))]
    print(json.dumps({"opened": opened, "from_dirs": from_dirs, "remote": remote}))
""")


def test_loading_never_runs_code_from_the_model_directory(tiny_dir, tmp_path):
    dirs = []
    for name in ("qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny"):
        d = tmp_path / name
        shutil.copytree(tiny_dir(name), d)
        # every module named by config.json or tokenizer_config.json's auto_map raises when executed
        refs = set()
        for cfg in ("config.json", "tokenizer_config.json"):
            if (d / cfg).is_file():
                for value in json.loads((d / cfg).read_text()).get("auto_map", {}).values():
                    refs.update(v for v in (value if isinstance(value, list) else [value]) if v)
        for ref in refs:
            (d / f"{ref.split('.')[0]}.py").write_text("raise RuntimeError('model directory code was executed')\n")
        if name != "gpt-neox-tiny":
            assert refs and any(d.glob("modeling_*.py"))
        dirs.append(str(d))
    res = subprocess.run([sys.executable, "-c", _NO_CODE_SCRIPT, *dirs], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found == {"opened": [], "from_dirs": [], "remote": []}


def test_buffers_real_checkpoints_carry_are_not_errors(copy_tiny, load_tiny):
    """InternLM / GPT-NeoX .bin and safetensors files from older transformers carry rotary inv_freq and mask buffers."""
    d = copy_tiny("gpt-neox-tiny")

    def edit(state):
        state["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(2)
        state["gpt_neox.layers.1.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
        state["gpt_neox.layers.1.attention.masked_bias"] = torch.tensor(-1e9)

    _edit_safetensors(d / "model-00002-of-00002.safetensors", edit)
    d2 = copy_tiny("internlm-tiny")
    _edit_bin(d2 / "pytorch_model-00002-of-00002.bin",
              lambda s: s.update({"model.layers.2.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    for path, name in ((d, "gpt-neox-tiny"), (d2, "internlm-tiny")):
        got, ref = load(path).model.state_dict(), load_tiny(name).model.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ hostile checkpoints (#12 item 6)


def test_index_entry_outside_the_model_directory_is_refused(copy_tiny, tmp_path):
    d = copy_tiny("gpt-neox-tiny")
    other = tmp_path / "other"
    other.mkdir()
    shutil.move(d / "model-00002-of-00002.safetensors", other / "model-00002-of-00002.safetensors")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: ("../other/model-00002-of-00002.safetensors" if v.startswith("model-00002") else v)
                          for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert (d / "../other/model-00002-of-00002.safetensors").is_file()  # the file it names does exist
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(index) in msg and "../other/model-00002-of-00002.safetensors" in msg
    assert "outside" in msg and "model directory only" in msg
    data["weight_map"] = {k: str(other / "model-00002-of-00002.safetensors") if v.startswith("../") else v
                          for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert "outside" in error_of(lambda: load(d), CheckpointError)  # an absolute path too


@pytest.mark.parametrize("tiny,edit_file,name", [
    ("internlm-tiny", "pytorch_model-00002-of-00002.bin", "model.norm.weight"),
    ("internlm-tiny", "pytorch_model-00002-of-00002.bin", "model.layers.2.self_attn.k_proj.weight"),
    ("gpt-neox-tiny", "model-00002-of-00002.safetensors", "gpt_neox.final_layer_norm.weight"),
])
def test_integer_tensor_where_floating_point_belongs_is_refused(copy_tiny, tiny, edit_file, name):
    d = copy_tiny(tiny)

    def edit(state):
        state[name] = torch.ones_like(state[name], dtype=torch.int64)

    (_edit_bin if edit_file.endswith(".bin") else _edit_safetensors)(d / edit_file, edit)
    msg = error_of(lambda: load(d), CheckpointError)
    assert f"{name} is int64" in msg and "floating point" in msg


def _config_with(copy_tiny, name: str, **fields) -> Path:
    d = copy_tiny(name)
    config = json.loads((d / "config.json").read_text())
    config.update(fields)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("value", ["3", 3.0, True])
@pytest.mark.parametrize("tiny,field", [("internlm-tiny", "num_hidden_layers"), ("qwen-tiny", "num_attention_heads"),
                                        ("gpt-neox-tiny", "vocab_size")])
def test_config_integer_of_another_type_is_refused(copy_tiny, tiny, field, value):
    d = _config_with(copy_tiny, tiny, **{field: value})
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(d / "config.json") in msg and f"{field} is {json.dumps(value)}; expected a positive integer" in msg


@pytest.mark.parametrize("tiny,field,expected", [("internlm-tiny", "rms_norm_eps", "a positive number"),
                                                 ("qwen-tiny", "seq_length", "a positive integer"),
                                                 ("gpt-neox-tiny", "use_parallel_residual", "true or false")])
def test_config_null_is_refused_not_defaulted(copy_tiny, tiny, field, expected):
    d = _config_with(copy_tiny, tiny, **{field: None})
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(d / "config.json") in msg and f"{field} is null; expected {expected}" in msg


def test_zero_heads_and_heads_not_dividing_hidden_size(copy_tiny):
    msg = error_of(lambda: load(_config_with(copy_tiny, "internlm-tiny", num_attention_heads=0)), CheckpointError)
    assert "num_attention_heads is 0; expected a positive integer" in msg
    for name in ("gpt-neox-tiny", "qwen-tiny"):
        d = _config_with(copy_tiny, name, num_attention_heads=5)
        msg = error_of(lambda: load(d), CheckpointError)
        assert str(d / "config.json") in msg and "num_attention_heads=5 does not divide hidden_size=64" in msg


@pytest.mark.parametrize("tiny,field", [("qwen-tiny", "rotary_emb_base"), ("gpt-neox-tiny", "rotary_pct"),
                                        ("internlm-tiny", "rms_norm_eps")])
def test_config_number_given_as_text_names_the_field(copy_tiny, tiny, field):
    d = _config_with(copy_tiny, tiny, **{field: "abc"})
    msg = error_of(lambda: load(d), CheckpointError)
    assert str(d / "config.json") in msg and f'{field} is "abc"; expected a positive number' in msg


def test_config_errors_stop_the_cut_and_the_hf_backend_too(copy_tiny):
    from npuinfer.device import get_device
    from npuinfer.backends.hf_model import load_hf_model
    from npuinfer.parallel.cut import cut_checkpoint

    d = _config_with(copy_tiny, "internlm-tiny", intermediate_size="160")
    for fn in (lambda: cut_checkpoint(d, 2), lambda: load_hf_model(d, get_device("cpu"), torch.float32)):
        assert 'intermediate_size is "160"; expected a positive integer' in error_of(fn, CheckpointError)
