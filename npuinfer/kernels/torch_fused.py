"""Fused kernels torch itself ships, for cuda and cpu: F.rms_norm and scaled_dot_product_attention (flash /
memory-efficient on cuda, the flash kernel on cpu). RoPE and SwiGLU have no fused torch op; the table falls
back to the plain reference for them (and says so)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


for _device in ("cpu", "cuda"):
    register("rms_norm", _device, "F.rms_norm", rms_norm)
    register("add_rms_norm", _device, "add + F.rms_norm", add_rms_norm)
    register("prefill_attention", _device, "sdpa", sdpa)
    register("decode_attention", _device, "sdpa", sdpa)
