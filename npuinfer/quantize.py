"""``npuinfer quantize``: a float checkpoint -> a MindIE-layout quantized directory, without Ascend tools.

W8A16: round-to-nearest, symmetric, per output channel (weight_offset written as zeros). W8A8: the same
weights, and per-tensor asymmetric activation scale/offset from the min/max each linear's input reaches over
the calibration prompts, optionally after SmoothQuant smoothing (alpha): the norm before a quantized linear is
divided per channel by s_j = max|x_j|^alpha / max|W_:j|^(1-alpha) and the linear's columns multiplied by it,
which moves activation outliers into the weights (the maths is unchanged in floating point). Layers in
``skip_layers`` and the head stay floating point.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .atomic import swap_directory
from .checkpoint import CheckpointError, args_from_config, detect_family, read_canonical, read_config
from .progress import progress
from .runtime import load_model
from .quant_files import description_file_name, find_quant_files, has_npy_layout, weight_file_name
from .quant.layout import describe_tensors, quant_from_canonical
from .quant.linear import LINEARS
from .quant.scheme import W8A8, W8A16, activation_params, quantize_weight, w8a8_params

# The Baichuan2 guide's calibration prompts.
DEFAULT_CALIBRATION = ["中国的首都在哪里？", "请做一首诗歌：", "我想要学习python，该怎么学习？",
                       "请帮我写一篇关于大模型推理优化的任职报告：", "中国最值得去的几个景点"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npy")
NOT_COPIED = ("npuinfer_tiny.json",)  # the tiny-cache marker: the output is not npuinfer's own cache
# norm -> the linears that read its output (smoothing divides the norm and multiplies their columns)
SMOOTH_PAIRS = (("attention_norm", ("attention.wqkv",)), ("ffn_norm", ("feed_forward.w1", "feed_forward.w3")))


def read_calibration(path: str | None) -> list[str]:
    """Prompts, one per line (blank lines skipped), or the guide's five."""
    if path is None:
        return list(DEFAULT_CALIBRATION)
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--calib-file {path}: cannot read it as UTF-8 text ({exc})") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"--calib-file {path}: no prompts (expected one per line)")
    return prompts


def target_linears(state: dict[str, Tensor], n_layers: int, skip: set[int]) -> list[str]:
    return [f"layers.{i}.{lin}" for i in range(n_layers) if i not in skip for lin in LINEARS
            if f"layers.{i}.{lin}.weight" in state]


@torch.no_grad()
def activation_stats(model_dir: Path, prompts: list[str], targets: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per target linear, the per-input-channel (min, max) its input reached over the prompts (fp32 model)."""
    loaded = load_model(model_path=model_dir, device="cpu", dtype="fp32")
    model = loaded.model
    stats: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            lo, hi = x.amin(dim=0), x.amax(dim=0)
            if name in stats:
                lo, hi = torch.minimum(lo, stats[name][0]), torch.maximum(hi, stats[name][1])
            stats[name] = (lo, hi)
        return record

    handles = [model.get_submodule(t).register_forward_pre_hook(hook(t)) for t in targets]
    try:
        for prompt in progress(prompts, desc="calibrating activations", unit="prompt"):
            ids = loaded.tokenizer.encode(prompt)[: model.args.max_seq_len]
            model.setup_caches(1, len(ids))
            model(torch.tensor([ids]), 0)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def smooth(state: dict[str, Tensor], stats: dict[str, tuple[Tensor, Tensor]], targets: list[str], n_layers: int,
           alpha: float) -> None:
    """SmoothQuant in place on the canonical float state and the recorded input ranges."""
    for i in range(n_layers):
        for norm, linears in SMOOTH_PAIRS:
            names = [f"layers.{i}.{lin}" for lin in linears if f"layers.{i}.{lin}" in targets]
            if not names:
                continue
            lo, hi = stats[names[0]]
            act = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-5)
            wmax = torch.stack([state[f"{n}.weight"].float().abs().amax(dim=0) for n in names]).amax(0).clamp(min=1e-5)
            s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
            for kind in ("weight", "bias"):
                key = f"layers.{i}.{norm}.{kind}"
                if key in state:
                    state[key] = (state[key].float() / s).to(state[key].dtype)
            for n in names:
                w = state[f"{n}.weight"]
                state[f"{n}.weight"] = (w.float() * s[None, :]).to(w.dtype)
                stats[n] = (stats[n][0] / s, stats[n][1] / s)


def refuse_non_finite(state: dict[str, Tensor], origin: dict[str, str], model_dir: Path) -> None:
    """A NaN or infinite weight, named as the checkpoint names it, before anything is written: rounding it
    fails in W8A8 (``cannot convert float NaN to integer``), and W8A16 wrote a checkpoint that failed at inference."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{origin.get(name, name)} ({count} of {tensor.numel()} values)")
    if bad:
        raise CheckpointError(f"{model_dir}: non-finite (NaN or infinite) weights in {', '.join(bad)}; nothing was "
                              "written: quantize a checkpoint whose weights are all finite")


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, scheme: str, prompts: list[str] | None = None,
                        skip_layers: set[int] | None = None, smooth_alpha: float | None = None) -> dict:
    """Write ``out_dir`` (config, tokenizer files, quantized weights, description); returns a summary."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if scheme not in (W8A16, W8A8):
        raise ValueError(f"scheme: expected W8A16 or W8A8, got {scheme!r}")
    if smooth_alpha is not None and (scheme != W8A8 or not 0 < smooth_alpha < 1):
        raise ValueError("--smooth: applies to --w8a8 only, with an alpha between 0 and 1 (e.g. 0.5)")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out_dir}: must differ from --model-path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir}: exists and is not empty; give a new directory")
    config = read_config(model_dir)
    config_path = str(model_dir / "config.json")
    family = detect_family(config, config_path)
    args = args_from_config(config, family, path=config_path)
    if find_quant_files(model_dir) is not None or has_npy_layout(model_dir):
        raise CheckpointError(f"{model_dir}: is already quantized; quantize the float checkpoint")
    skip = set(skip_layers or ())
    bad = sorted(i for i in skip if not 0 <= i < args.n_layers)
    if bad:
        raise ValueError(f"--skip-layers: {bad} out of range; the model has layers 0..{args.n_layers - 1}")
    # the head as stored (Baichuan2's NormHead is normalised again whenever the output is read)
    state, origin = read_canonical(model_dir, config, family, args.with_(norm_head=False))
    refuse_non_finite(state, origin, model_dir)
    if config.get("tie_word_embeddings") and state.get("output.weight") is state.get("tok_embeddings.weight"):
        state.pop("output.weight")  # a tied head is filled from the embedding again when read
    dtype = state["tok_embeddings.weight"].dtype
    targets = target_linears(state, args.n_layers, skip)
    if scheme == W8A8:
        stats = activation_stats(model_dir, prompts or DEFAULT_CALIBRATION, targets)
        if smooth_alpha is not None:
            smooth(state, stats, targets, args.n_layers, smooth_alpha)
    for name in progress(targets, desc=f"quantizing {scheme}", unit="linear"):
        weight, bias = state.pop(f"{name}.weight"), state.get(f"{name}.bias")
        if scheme == W8A16:
            q, scale = quantize_weight(weight)
            state.update({f"{name}.weight": q, f"{name}.weight_scale": scale.to(dtype),
                          f"{name}.weight_offset": torch.zeros_like(scale, dtype=dtype)})
            continue
        lo, hi = stats[name]
        x_scale, x_offset = activation_params(lo.min(), hi.max())
        params = w8a8_params(weight, bias, torch.tensor([x_scale], dtype=dtype), torch.tensor([x_offset], dtype=dtype))
        state.pop(f"{name}.bias", None)  # folded into quant_bias
        state.update({f"{name}.{k}": v for k, v in params.items()})
    out = quant_from_canonical(family, state, args)
    _write(model_dir, out_dir, out, scheme)
    return {"family": family, "scheme": scheme, "quantized_linears": len(targets), "skipped_layers": sorted(skip),
            "weights": weight_file_name(scheme), "bytes": sum(t.numel() * t.element_size() for t in out.values())}


def _write(model_dir: Path, out_dir: Path, state: dict[str, Tensor], scheme: str) -> None:
    """Into a staging folder renamed into place, so an interrupted run leaves no half directory."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for item in model_dir.iterdir():  # config.json, tokenizer and generation files; never weights
            if (item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.endswith(".index.json")
                    and item.name not in NOT_COPIED):
                shutil.copy2(item, staging / item.name)
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / weight_file_name(scheme)),
                  metadata={"format": "pt", "model_quant_type": scheme})
        (staging / description_file_name(scheme)).write_text(
            json.dumps(describe_tensors(state, scheme), indent=2) + "\n", encoding="utf-8")
        swap_directory(staging, out_dir)  # out_dir, if present, is empty (checked above)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
