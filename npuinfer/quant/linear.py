"""Quantized linear layers, swapped in for nn.Linear after the model is built (gpt-fast style): model.py
knows nothing of quantization. Which linears are quantized, and how, is read from the canonical state dict
(a linear ``P`` with ``P.weight_scale`` is W8A16, with ``P.deq_scale`` W8A8), so float checkpoints, MindIE
files, ModelSlim .npy dicts and part_model/ shards all give the plan the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..weight_files import is_file_memory
from .kernels import DEQUANTIZE, FALLBACK, Kernel, choose_kernel
from .scheme import W8A8, W8A16

W8A16_PARAMS = ("weight_scale", "weight_offset")
W8A8_PARAMS = ("input_scale", "input_offset", "quant_bias", "deq_scale")
QUANT_PARAMS = W8A16_PARAMS + W8A8_PARAMS
ROW_PARAMS = ("weight_scale", "weight_offset", "quant_bias", "deq_scale")  # one entry per output channel
TENSOR_PARAMS = ("input_scale", "input_offset")  # per tensor: replicated under TP
FP32_PARAMS = ("input_scale", "input_offset", "deq_scale")  # kept fp32 whatever the model dtype (deq_scale ~1e-6)
# A quantized linear's tensors that are integers: the weight and W8A8's quant_bias always; deq_scale is fp32, or
# int64 holding the fp32 bits (MindIE's layout for fp16 models, see scheme.decode_deq_scale).
INTEGER_PARAMS = {"weight": torch.int8, "quant_bias": torch.int32}
PACKED_PARAMS = {"deq_scale": torch.int64}

# The linears a checkpoint may quantize (the head, output, never is).
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


@dataclass(frozen=True)
class LinearPlan:
    scheme: str
    bias: bool  # a float bias tensor beside the quantized parameters


def split_param(name: str) -> tuple[str, str]:
    """'layers.0.attention.wqkv.weight_scale' -> ('layers.0.attention.wqkv', 'weight_scale')."""
    prefix, _, param = name.rpartition(".")
    return prefix, param


def plan_from_state(state: dict[str, Tensor]) -> dict[str, LinearPlan]:
    """Canonical linear prefix -> LinearPlan, for every quantized linear in ``state`` (empty for float)."""
    plan = {}
    for name in state:
        prefix, param = split_param(name)
        if param in ("weight_scale", "deq_scale"):
            plan[prefix] = LinearPlan(W8A16 if param == "weight_scale" else W8A8, f"{prefix}.bias" in state)
    return plan


def wrong_dtypes(state: dict[str, Tensor]) -> dict[str, str]:
    """Name -> the dtype expected, for each tensor of a canonical state whose dtype does not fit: a quantized
    linear's weight is int8 and its quant_bias int32, its deq_scale fp32 or int64-packed; all else floating point."""
    quantized = plan_from_state(state)
    wrong = {}
    for name, tensor in state.items():
        prefix, param = split_param(name)
        integer = INTEGER_PARAMS.get(param) if prefix in quantized else None
        packed = PACKED_PARAMS.get(param) if prefix in quantized else None
        if integer is not None and tensor.dtype != integer:
            wrong[name] = str(integer).removeprefix("torch.")
        elif integer is None and not tensor.is_floating_point() and tensor.dtype != packed:
            wrong[name] = "floating point" + (f" or {str(packed).removeprefix('torch.')}" if packed else "")
    return wrong


def load_dtype(name: str, tensor: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a canonical tensor is loaded in: integers stay, quantization scales of W8A8 stay fp32."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if split_param(name)[1] in FP32_PARAMS else dtype


class QuantLinear(nn.Module):
    """int8 weight [out, in] plus the scheme's parameters as buffers; the matmul is chosen by ``prepare``."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n = out_features
        self.register_buffer("weight", torch.empty(n, in_features, dtype=torch.int8, device=device))
        if scheme == W8A16:
            self.register_buffer("weight_scale", torch.empty(n, 1, device=device))
            self.register_buffer("weight_offset", torch.empty(n, 1, device=device))
        else:
            self.register_buffer("input_scale", torch.empty(1, device=device))
            self.register_buffer("input_offset", torch.empty(1, device=device))
            self.register_buffer("quant_bias", torch.empty(n, dtype=torch.int32, device=device))
            self.register_buffer("deq_scale", torch.empty(n, device=device))
        self.register_buffer("bias", torch.empty(n, device=device) if bias else None)
        self.kernel_name = DEQUANTIZE
        self._kernel: Kernel | None = None
        self.has_offset = True
        self._dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype (the model's), set by ``prepare``."""
        if self._dtype is not None:
            return self._dtype
        return self.bias.dtype if self.bias is not None else (
            self.weight_scale.dtype if self.scheme == W8A16 else torch.float32)

    def own_weight(self) -> None:
        """On cpu, hold the int8 weight in memory of its own: a tensor read from a safetensors file is a slice of
        the file's mapping at whatever offset the file gives it (8-byte steps), and torch._weight_int8pack_mm's
        bf16 path reads the weight with aligned vector loads: from 4 rows up a misaligned weight crashed the
        process (SIGSEGV at Qwen-7B's real size, issue 13). The copy is 64-byte aligned, and once a file's tensors
        are all copied its mapping, and the pages read from it, are released."""
        w = self.weight
        if w.device.type == "cpu" and (w.data_ptr() % 64 or is_file_memory(w)):
            self.weight = w.clone(memory_format=torch.contiguous_format)

    def prepare(self, device_type: str, dtype: torch.dtype, mode: str = "fused") -> list[str]:
        """Pick the kernel for this device and dtype (``mode`` plain: the reference); returns why faster
        candidates were passed over."""
        self._dtype = dtype
        if self.scheme == W8A16:
            self.has_offset = bool(self.weight_offset.any())
        self.kernel_name, self._kernel, skipped = choose_kernel(self, device_type, mode)
        return skipped

    def forward(self, x: Tensor) -> Tensor:
        kernel = self._kernel or FALLBACK[self.scheme]
        y = kernel(x.reshape(-1, x.shape[-1]), self).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}, kernel={self.kernel_name}"


def swap_linears(model: nn.Module, plan: dict[str, LinearPlan]) -> None:
    """Replace the nn.Linear at each planned prefix by a QuantLinear of the same shape (on the same device)."""
    for prefix, entry in plan.items():
        parent_name, _, child = prefix.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"quantized tensors name {prefix}, which is not a linear layer of this model") from None
        if not isinstance(old, nn.Linear) or prefix == "output":
            raise ValueError(f"quantized tensors name {prefix}: only the decoder layers' linears are quantized "
                             f"({', '.join(LINEARS)}); the head stays floating point")
        setattr(parent, child, QuantLinear(old.in_features, old.out_features, entry.scheme, entry.bias,
                                           device=old.weight.device))


def prepare(model: nn.Module, device_type: str, dtype: torch.dtype, mode: str = "fused") -> dict[str, str]:
    """Choose every QuantLinear's kernel once (checked against dequantize-then-matmul; ``mode`` plain: that
    reference); returns the summary."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kernels: dict[str, set[str]] = {}
    notes: list[str] = []
    chosen: dict[tuple, tuple] = {}
    for layer in layers:
        layer.own_weight()
        key = (layer.scheme, layer.in_features, layer.out_features, layer.bias is not None)
        if key not in chosen:
            notes += layer.prepare(device_type, dtype, mode)
            chosen[key] = (layer.kernel_name, layer._kernel)
        else:
            layer._dtype = dtype
            if layer.scheme == W8A16:
                layer.has_offset = bool(layer.weight_offset.any())
            layer.kernel_name, layer._kernel = chosen[key]
        kernels.setdefault(layer.scheme, set()).add(layer.kernel_name)
    return summarize(layers, kernels, notes)


def summarize(layers: list[QuantLinear], kernels: dict[str, set[str]], notes: list[str]) -> dict[str, str]:
    if not layers:
        return {"quantization": "none", "quant_kernel": ""}
    schemes = sorted(kernels)
    return {"quantization": "+".join(schemes),
            "quant_kernel": "; ".join(f"{s}: {', '.join(sorted(kernels[s]))}" for s in schemes),
            "quant_layers": str(len(layers)),
            **({"quant_kernel_notes": " | ".join(dict.fromkeys(notes))} if notes else {})}


def describe(model: nn.Module) -> dict[str, str]:
    """The quantization of a loaded model and the kernels its layers run (for rows and cache_meta)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kernels: dict[str, set[str]] = {}
    for layer in layers:
        kernels.setdefault(layer.scheme, set()).add(layer.kernel_name)
    return summarize(layers, kernels, [])
