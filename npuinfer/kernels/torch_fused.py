"""Fused kernels torch itself ships, for cuda and cpu: F.rms_norm and scaled_dot_product_attention (flash /
memory-efficient on cuda, the flash kernel on cpu), and on cpu the linear layers through oneDNN with weights
prepacked once at load (bf16). RoPE and SwiGLU have no fused torch op; the table falls back to the plain
reference for them (and says so)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import repeat_kv
from .registration import register


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    total = x + residual
    return rms_norm(total, weight, eps), total


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    t, s = q.shape[-2], k.shape[-2]
    if causal and t != s:  # SDPA's is_causal aligns the diagonal top-left; the table's causal is bottom-right
        mask, causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t), False
    gqa = {}
    if k.shape[1] != q.shape[1]:  # grouped-query attention: SDPA reads the shared K/V heads itself (torch >= 2.5)
        if SDPA_GQA:
            gqa = {"enable_gqa": True}
        else:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)


def _sdpa_has_gqa() -> bool:
    try:
        one = torch.zeros(1, 2, 1, 4)
        F.scaled_dot_product_attention(one, one[:, :1], one[:, :1], enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_GQA = _sdpa_has_gqa()  # torch >= 2.5: SDPA (and cpu's flash kernel) read shared K/V heads themselves


def onednn_prepack(weight: Tensor) -> Tensor:
    """A bf16 cpu weight reordered once into oneDNN's blocked layout (an opaque mkldnn tensor, what inductor's
    freezing makes); any other weight is returned as it is. The reorder does not depend on the batch."""
    if weight.is_mkldnn or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not _ONEDNN_BF16:
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear through oneDNN on a prepacked weight (``onednn_prepack``), aten's F.linear on a plain one.
    Decode's matrix-vector products are where it pays: aten's bf16 GEMV streamed 0.53x the bytes/s of its fp32
    one on this project's Xeon (avx512_bf16); oneDNN's on a prepacked weight ran 1.29x aten's, with the same
    result bits (issue #15). fp32 weights are left to aten: no gain measured, and tiny fp32 baselines stay."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


_ONEDNN_BF16 = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

register("linear", "cpu", "oneDNN prepacked (bf16; aten otherwise)", onednn_linear, prepare=onednn_prepack)

for _device in ("cpu", "cuda"):
    register("rms_norm", _device, "F.rms_norm", rms_norm)
    register("add_rms_norm", _device, "add + F.rms_norm", add_rms_norm)
    register("prefill_attention", _device, "sdpa", sdpa)
    register("decode_attention", _device, "sdpa", sdpa)
