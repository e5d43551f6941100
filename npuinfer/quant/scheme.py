"""The arithmetic of W8 quantization, in the msModelSlim convention (one place, used by the writer, the layers
and the tests' fake-quant reference).

W8A16, per output channel::

    weight_fp = (weight_int8 - weight_offset) * weight_scale          # weight_scale, weight_offset: [n, 1]

W8A8, per-tensor activations and symmetric per-channel weights::

    x_int8 = clamp(round(x / input_scale + input_offset), -128, 127)  # input_scale, input_offset: [1]
    y      = (x_int8 @ weight_int8.T + quant_bias) * deq_scale         # quant_bias int32 [n], deq_scale [n]

so ``deq_scale = input_scale * weight_scale`` and ``quant_bias = round(bias / deq_scale) - input_offset *
sum_k weight_int8``. (msModelSlim's documented formulas; the npu kernels compute ``(w + offset) * scale``, so
the offset is negated when handed to them, as MindIE does when it loads.)
"""
from __future__ import annotations

import torch
from torch import Tensor

QMIN, QMAX = -128, 127
W8A16, W8A8 = "W8A16", "W8A8"
SCHEMES = (W8A16, W8A8)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest per output channel: (int8 [n, k], scale fp32 [n, 1])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round(w / scale), -QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(weight: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """fp32 [n, k] from int8 [n, k] and per-channel scale / offset [n, 1] (or [n])."""
    scale = scale.float().reshape(-1, 1)
    w = weight.float()
    if offset is not None:
        w = w - offset.float().reshape(-1, 1)
    return w * scale


def activation_params(x_min: float, x_max: float) -> tuple[float, float]:
    """Asymmetric per-tensor (scale, integer offset) mapping [x_min, x_max] (widened to hold 0) onto [-128, 127]."""
    lo, hi = min(float(x_min), 0.0), max(float(x_max), 0.0)
    scale = max((hi - lo) / (QMAX - QMIN), 1e-8)
    offset = float(round(QMIN - lo / scale))
    return scale, max(min(offset, QMAX), QMIN)


def quantize_activation(x: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    return torch.clamp(torch.round(x.float() / scale.float() + offset.float()), QMIN, QMAX).to(torch.int8)


def fake_quantize_activation(x: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """x after an int8 round trip (what a W8A8 layer actually multiplies), in x's dtype."""
    q = quantize_activation(x, scale, offset).float()
    return ((q - offset.float()) * scale.float()).to(x.dtype)


def w8a8_params(weight: Tensor, bias: Tensor | None, input_scale: Tensor, input_offset: Tensor
                ) -> dict[str, Tensor]:
    """The MindIE W8A8 tensors of one linear, given its float weight/bias and calibrated activation range.

    ``input_scale`` / ``input_offset`` are taken as stored (their dtype's rounding included), so deq_scale and
    quant_bias agree with what a reader will use.
    """
    q, w_scale = quantize_weight(weight)
    deq_scale = (input_scale.float() * w_scale.reshape(-1)).float()
    correction = input_offset.double() * q.double().sum(dim=1)
    folded = torch.zeros_like(correction) if bias is None else bias.double() / deq_scale.double()
    quant_bias = torch.round(folded - correction).to(torch.int32)
    return {"weight": q, "input_scale": input_scale, "input_offset": input_offset, "quant_bias": quant_bias,
            "deq_scale": deq_scale}


def w8a8_float_bias(quant_bias: Tensor, deq_scale: Tensor, weight: Tensor, input_offset: Tensor) -> Tensor:
    """The float bias folded into quant_bias (for the reference and for re-splitting under TP)."""
    correction = input_offset.double() * weight.double().sum(dim=1)
    return ((quant_bias.double() + correction) * deq_scale.double()).float()


def decode_deq_scale(deq_scale: Tensor) -> Tensor:
    """deq_scale as fp32: MindIE stores it int64-packed (fp32 bits in the low 32) for fp16 models."""
    if deq_scale.dtype == torch.int64:
        return deq_scale.to(torch.int32).view(torch.float32)
    return deq_scale.float()
