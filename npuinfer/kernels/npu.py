"""Ascend fused kernels through torch_npu (not run here: no NPU on the development machines).

Every call passes keyword arguments, because the positional order of these ops changed between CANN
releases. Keyword *names* changed too (``scale_value`` became ``scale`` in npu_fused_infer_attention_score;
the first tensor is ``self``, ``x`` or ``input`` depending on the release), so each name is taken from the
installed op's own schema (``torch.ops.npu.<op>.default._schema``) rather than assumed. Documentation followed:
- npu_rms_norm(self, gamma, epsilon=1e-6) -> (y, rstd): torch_npu API reference 6.0.0 / 7.0.0.
- npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x_sum): op-plugin tests (Ascend/op-plugin 26.0.0).
- npu_rotary_mul(input, r1, r2, rotary_mode='half'): torch_npu API reference 7.0.0 (6.0.0: no rotary_mode,
  r1/r2 11SD/1S1D/S11D; 7.0.0 adds B1SD for a BNSD input).
- npu_fused_infer_attention_score(query, key, value, *, pse_shift, atten_mask, num_heads, scale|scale_value,
  input_layout, num_key_value_heads, sparse_mode, ...) -> (out, lse): torch_npu API reference 6.0.RC3 / 6.0.0
  (scale_value) and 7.0.0 (scale); query length 1 takes the incremental (decode) branch.
- npu_swiglu(input, dim=-1): torch_npu API reference 6.0.0 / 7.2.0.
"""
from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from .registration import register


@cache
def _arg_names(op: str) -> tuple[str, ...]:
    """The op's argument names as Python accepts them (a schema's ``self`` is ``input`` in Python)."""
    schema = getattr(torch.ops.npu, op).default._schema
    return tuple("input" if a.name == "self" else a.name for a in schema.arguments)


def _call(op: str, first: Tensor, **kwargs):
    """torch_npu.<op> with the first tensor under the schema's own name and every other argument by name;
    an argument this release does not know is left out (None) or refused (anything else)."""
    import torch_npu  # type: ignore[import-not-found]

    names = _arg_names(op)
    unknown = [k for k, v in kwargs.items() if k not in names and v is not None]
    if unknown:
        raise TypeError(f"torch_npu.{op} of this release takes no {unknown} (its arguments: {list(names)})")
    given = {k: v for k, v in kwargs.items() if k in names}
    return getattr(torch_npu, op)(**{names[0]: first}, **given)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _call("npu_rms_norm", x, gamma=weight, epsilon=eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, _rstd, total = _call("npu_add_rms_norm", x, x2=residual, gamma=weight, epsilon=eps)
    return y, total


def rope(x: Tensor, cos: Tensor, sin: Tensor, rot_dim: int) -> Tensor:
    """x [..., B, H, T, D] folded to the op's 4-D BNSD; partial rotary: only the rotary slice goes in."""
    *lead, heads, t, d = x.shape
    flat = x.reshape(-1, heads, t, d)
    repeat = flat.shape[0] // cos.shape[0]
    if cos.shape[0] > 1 and repeat > 1:  # per-row positions (B1SD), q and k stacked in front of the batch
        cos, sin = cos.repeat(repeat, 1, 1, 1), sin.repeat(repeat, 1, 1, 1)
    x_rot = flat[..., :rot_dim].contiguous()
    mode = "half" if "rotary_mode" in _arg_names("npu_rotary_mul") else None
    out = _call("npu_rotary_mul", x_rot, r1=cos.contiguous(), r2=sin.contiguous(), rotary_mode=mode)
    if rot_dim < d:
        out = torch.cat((out, flat[..., rot_dim:]), dim=-1)
    return out.reshape(*lead, heads, t, d)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """npu_fused_infer_attention_score in BNSD, K/V at their own head count (grouped-query attention is the
    op's own: num_key_value_heads). The op's atten_mask is True where a key is *not* attended;
    ALiBi goes in as pse_shift (the bias without its -inf entries, which become the mask)."""
    bsz, heads, t, d = q.shape
    s = k.shape[2]
    atten_mask = pse = None
    if causal:
        atten_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).triu(s - t + 1)[None, None]
        atten_mask = atten_mask.expand(bsz, 1, t, s).contiguous()
    elif mask is not None:
        if mask.dtype == torch.bool:
            atten_mask = (~mask).expand(bsz, 1, t, s).contiguous()
        else:
            blocked = torch.isneginf(mask)
            atten_mask = blocked[:, :1].expand(bsz, 1, t, s).contiguous()
            pse = mask.masked_fill(blocked, 0.0).to(q.dtype).expand(-1, heads, t, s).contiguous()
    names = _arg_names("npu_fused_infer_attention_score")
    scale = {"scale" if "scale" in names else "scale_value": 1.0 / math.sqrt(d)}
    out, _lse = _call("npu_fused_infer_attention_score", q.contiguous(), key=k.contiguous(), value=v.contiguous(),
                      pse_shift=pse, atten_mask=atten_mask, num_heads=heads, num_key_value_heads=k.shape[1],
                      input_layout="BNSD", sparse_mode=0, **scale)
    return out


def gated_mlp(gate: Tensor, up: Tensor) -> Tensor:
    """npu_swiglu takes gate and up concatenated in that order."""
    return _call("npu_swiglu", torch.cat((gate, up), dim=-1), dim=-1)


register("rms_norm", "npu", "torch_npu.npu_rms_norm", rms_norm)
register("add_rms_norm", "npu", "torch_npu.npu_add_rms_norm", add_rms_norm)
register("rope", "npu", "torch_npu.npu_rotary_mul", rope)
register("prefill_attention", "npu", "torch_npu.npu_fused_infer_attention_score", attention)
register("decode_attention", "npu", "torch_npu.npu_fused_infer_attention_score", attention)
register("gated_mlp", "npu", "torch_npu.npu_swiglu", gated_mlp)
