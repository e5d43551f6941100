"""The quantized linears' matmuls, registered in the one kernel table (npuinfer.kernels) as the ops
``w8a16_matmul`` and ``w8a8_matmul``: the plain reference is dequantize-then-matmul, and each device's kernel is
checked against it once per layer shape before it is used (``choose_kernel``); a kernel that is missing, refuses
the shapes or disagrees gives way to its plainer form, then to the reference. ``--kernels plain`` runs the
reference; a plugin registers its own with ``npuinfer.kernels.register(op, device_type, name, fn)``.

cpu:  W8A16 npuinfer's own AVX-512 GEMV for 1-4 rows (kernels/csrc/w8a16_gemv.cpp; torch._weight_int8pack_mm from
      5 rows) where it builds, plainer form torch._weight_int8pack_mm; W8A8 torch._int_mm (int32 accumulation).
cuda: W8A16 dequantize-then-matmul, W8A8 torch._int_mm (rows padded to 17: cuda's kernel needs M > 16).
npu:  W8A16 torch_npu.npu_weight_quant_batchmatmul, W8A8 torch_npu.npu_quant_matmul, keyword arguments only
      (positional order changed between CANN releases), looked up as kernels/npu.py does. The cuda and npu
      entries are not run here; the npu calls are checked on cpu against torch_npu's schemas
      (tests/test_npu_conformance.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import cpu_extension, matmul_candidates, register_default, register_plain
from ..kernels import npu as npu_ops
from .scheme import W8A8, W8A16, decode_deq_scale, dequantize_weight, quantize_activation

Kernel = Callable[[Tensor, "torch.nn.Module"], Tensor]  # (x [M, k], layer) -> y [M, n] without the float bias
DEQUANTIZE = "dequantize"
CPU_GEMV = "npuinfer w8a16_gemv (AVX-512, 1-4 rows; int8pack beyond)"


# ---------------------------------------------------------------- W8A16: y = x @ ((w - offset) * scale).T


def w8a16_dequantize(x: Tensor, layer) -> Tensor:
    w = dequantize_weight(layer.weight, layer.weight_scale, layer.weight_offset).to(x.dtype)
    return F.linear(x, w)


def _less_offset(y: Tensor, x: Tensor, layer) -> Tensor:
    # the int8 kernels are symmetric: x @ ((w - o) * s).T = kernel(x, w, s) - sum_k(x) * (o * s)
    if not layer.has_offset:
        return y
    return y - x.sum(dim=-1, keepdim=True) * (layer.weight_offset.reshape(-1) * layer.weight_scale.reshape(-1)
                                               ).to(x.dtype)


def w8a16_int8pack(x: Tensor, layer) -> Tensor:
    scale = layer.weight_scale.reshape(-1).to(x.dtype)
    return _less_offset(torch._weight_int8pack_mm(x.contiguous(), layer.weight, scale), x, layer)


GEMV_ROWS = 4  # the most rows npuinfer's cpu GEMV takes; decode's batches are these


def w8a16_cpu_gemv(x: Tensor, layer) -> Tensor:
    if x.shape[0] > GEMV_ROWS:  # prefill: a matrix product, where int8pack is not short of arithmetic
        return w8a16_int8pack(x, layer)
    return _less_offset(cpu_extension.load().w8a16_gemv(x, layer.weight, layer.weight_scale), x, layer)


def w8a16_npu(x: Tensor, layer) -> Tensor:
    n = layer.weight.shape[0]
    offset = (-layer.weight_offset).reshape(1, n).to(x.dtype) if layer.has_offset else None
    return npu_ops.op("npu_weight_quant_batchmatmul")(
        x=x, weight=layer.weight.t(), antiquant_scale=layer.weight_scale.reshape(1, n).to(x.dtype),
        antiquant_offset=offset)


# ---------------------------------------------------------------- W8A8: y = (xq @ w.T + quant_bias) * deq_scale


def _dequant_output(acc: Tensor, layer, dtype: torch.dtype) -> Tensor:
    return ((acc + layer.quant_bias).float() * decode_deq_scale(layer.deq_scale)).to(dtype)


def w8a8_dequantize(x: Tensor, layer) -> Tensor:
    xq = quantize_activation(x, layer.input_scale, layer.input_offset)
    acc = F.linear(xq.float(), layer.weight.float())  # fp32: exact while sums stay below 2^24, ~1e-7 beyond
    return _dequant_output(acc, layer, x.dtype)


def w8a8_int_mm(x: Tensor, layer) -> Tensor:
    xq = quantize_activation(x, layer.input_scale, layer.input_offset)
    return _dequant_output(torch._int_mm(xq, layer.weight.t()), layer, x.dtype)


def w8a8_int_mm_padded(x: Tensor, layer) -> Tensor:
    xq = quantize_activation(x, layer.input_scale, layer.input_offset)
    rows = xq.shape[0]
    if rows <= 16:
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    return _dequant_output(torch._int_mm(xq, layer.weight.t())[:rows], layer, x.dtype)


def w8a8_npu(x: Tensor, layer) -> Tensor:
    xq = quantize_activation(x, layer.input_scale, layer.input_offset)
    scale = decode_deq_scale(layer.deq_scale)
    if x.dtype == torch.float16:  # fp16 output takes the int64-packed scale
        scale = npu_ops.op("npu_trans_quant_param")(scale=scale)
    return npu_ops.op("npu_quant_matmul")(x1=xq, x2=layer.weight.t(), scale=scale, bias=layer.quant_bias,
                                           output_dtype=x.dtype)


OP = {W8A16: "w8a16_matmul", W8A8: "w8a8_matmul"}  # a scheme's op in the kernel table

register_plain(OP[W8A16], DEQUANTIZE, w8a16_dequantize)
register_plain(OP[W8A8], DEQUANTIZE, w8a8_dequantize)
register_default(OP[W8A16], "cpu", CPU_GEMV, w8a16_cpu_gemv, safer=("torch._weight_int8pack_mm", w8a16_int8pack))
register_default(OP[W8A16], "npu", "torch_npu.npu_weight_quant_batchmatmul", w8a16_npu)
register_default(OP[W8A8], "cpu", "torch._int_mm", w8a8_int_mm)
register_default(OP[W8A8], "cuda", "torch._int_mm", w8a8_int_mm_padded)
register_default(OP[W8A8], "npu", "torch_npu.npu_quant_matmul", w8a8_npu)
FALLBACK: dict[str, Kernel] = {W8A16: w8a16_dequantize, W8A8: w8a8_dequantize}


PROBE_ROWS = (1, 4, 5, 17, 33)


def choose_kernel(layer, device_type: str, mode: str = "fused") -> tuple[str, Kernel, list[str]]:
    """(name, kernel, reasons the earlier candidates were passed over) for ``layer`` on ``device_type``;
    ``mode`` "plain" (--kernels plain) runs the plain reference."""
    candidates, plain = matmul_candidates(OP[layer.scheme], device_type, mode)
    fallback = plain.fn
    skipped = []
    # 1 and 4 rows (decode's GEMV paths) and 5: past the 4-row blocks cpu kernels vectorize over, and a
    # remainder; 17 and 33: prefill's rows, which cuda's _int_mm takes unpadded (M > 16)
    probe = torch.randn(max(PROBE_ROWS), layer.weight.shape[1], device=layer.weight.device,
                        dtype=layer.compute_dtype)
    if layer.scheme == W8A8:  # inputs inside the calibrated range, so both paths quantize alike
        probe = (probe.float().clamp(-2, 2) * layer.input_scale.float() * 20).to(layer.compute_dtype)
    probes = [probe[:rows] for rows in PROBE_ROWS]
    tol = 1e-3 if layer.compute_dtype == torch.float32 else 3e-2
    with torch.no_grad():
        whole = fallback(probe, layer).float()  # row by row the same: computed once, sliced per probe
        expected = [whole[:rows] for rows in PROBE_ROWS]
        for candidate in candidates:
            name, kernel = candidate.label, candidate.fn
            try:
                got = [kernel(p, layer).float() for p in probes]
            except Exception as exc:  # missing op, unsupported dtype or shape, a kernel that cannot be built
                skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            if any(g.shape != e.shape or (g - e).abs().max() / e.abs().max().clamp(min=1e-6) > tol
                   for g, e in zip(got, expected)):
                skipped.append(f"{name}: disagrees with dequantize-then-matmul")
                continue
            return name, kernel, skipped
    return plain.name, fallback, skipped
