"""Plain torch references for every op in the kernel table: the definition each fused kernel is checked
against, and what ``--kernels plain`` runs. Only elementary ops (matmul, softmax, pow, ...), no fused ones."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise in fp32 as every family's reference code does, cast back, then scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): a block's residual add and the next norm."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def rope(x: Tensor, cos: Tensor, sin: Tensor, rot_dim: int) -> Tensor:
    """Rotate-half RoPE on the first ``rot_dim`` dims of each head (partial rotary: the rest passes).
    x: [..., B, H, T, D]; cos/sin: [B|1, 1, T, rot_dim]."""
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v. q [B,H,T,D], k/v [B,Hkv,S,D] with Hkv dividing H (grouped-query
    attention: query head h reads K/V head h // (H / Hkv)). ``mask``: bool [B|1,1,T,S] (True: the key is
    visible), or an additive float bias [B|1,H|1,T,S] (ALiBi, -inf where not visible); ``causal`` (no mask):
    query i sees keys up to S - T + i."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        t, s = scores.shape[-2:]
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """K or V [B, Hkv, S, D] with each head repeated for the H / Hkv query heads that read it: [B, H, S, D]."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def gated_mlp(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's activation: silu(gate) * up."""
    return F.silu(gate) * up


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight^T + bias: every projection and the head (aten's matmul)."""
    return F.linear(x, weight, bias)
