"""Ascend fused kernels through torch_npu (not run here: no NPU on the development machines).

torch_npu registers its ops as ``torch.ops.npu.<op>`` and exports each as ``torch_npu.<op>``, the same op
object, which binds keyword arguments to the names of the op's schema (Ascend/op-plugin
``op_plugin/config/op_plugin_functions.yaml``). Every call passes keyword arguments, because the positional
order of these ops changed between releases; the names are taken from the installed op's own schema, never
assumed: the first tensor is ``self`` in npu_rms_norm, npu_rotary_mul and npu_swiglu, although the
documentation prints ``input`` / ``x`` (an op object refuses ``input=`` for a ``self`` argument), and
arguments a release added (``rotary_mode`` from 7.0.0) are passed only where the schema has them.
``tests/test_npu_conformance.py`` runs these calls on cpu against the schemas of each release.

Schemas (op-plugin release branches 6.0.rc2 to 26.1.0):
- npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (y, rstd)
- npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (y, rstd, x_sum)
- npu_rotary_mul(Tensor self, Tensor r1, Tensor r2[, str rotary_mode='half' from 7.0.0]) -> Tensor: 6.x
  documents r1/r2 broadcast on any axis but the last, D a multiple of 64; from 7.0.0, 11SD or B1SD for a BNSD
  input and an even D below 896 on Atlas A2 / A3 (jit_compile=False kernels), 11SD and D = 128 on the
  jit_compile=True kernels of the other products (Atlas training and inference products).
- npu_fused_infer_attention_score(query, key, value, *, pse_shift, atten_mask, actual_seq_lengths_kv, ...,
  num_heads, scale, input_layout, num_key_value_heads, sparse_mode, ...) -> (out, lse): from 6.0.rc3; fp16 /
  bf16 only; atten_mask True where a key is *not* attended; query length 1 takes the incremental branch.
- npu_swiglu(Tensor self, int dim=-1): silu(first half) * second half.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import cache, wraps
from typing import Callable, Iterator

import torch
from torch import Tensor

from . import reference
from .registration import Fallback, register

# Where the ops are looked up: torch_npu's "npu" namespace, or a stand-in one (``stand_in``).
_namespace = "npu"
_stand_in_product: str | None = None


@contextmanager
def stand_in(namespace: str, product: str) -> Iterator[None]:
    """Run these kernels against ``torch.ops.<namespace>`` (ops registered with torch.library under torch_npu's
    schemas, on cpu) as if on ``product`` (an Ascend SoC name, e.g. "Ascend910B3"): the conformance test."""
    global _namespace, _stand_in_product
    saved = _namespace, _stand_in_product
    _namespace, _stand_in_product = namespace, product
    try:
        yield
    finally:
        _namespace, _stand_in_product = saved


def _ops():
    if _namespace == "npu":
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401  (registers torch.ops.npu)
    return getattr(torch.ops, _namespace)


def op(name: str):
    """torch_npu's op ``name`` (``torch.ops.npu.<name>``, what ``torch_npu.<name>`` is), or the stand-in's."""
    return getattr(_ops(), name)


@cache
def _schema_names(namespace: str, op: str) -> tuple[str, ...]:
    packet = _ops()
    if not hasattr(packet, op):
        return ()
    return tuple(a.name for a in getattr(packet, op).default._schema.arguments)


def _compile_constant(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)``, made on the first call: making it imports torch._dynamo,
    seconds and ~70 MB for every process that imports npuinfer, while only a compiled npu run needs it (the
    kernels' self-check makes the first call eagerly, before any graph is captured)."""
    marked: list[Callable] = []

    @wraps(fn)
    def call(*args):
        if not marked:
            marked.append(torch.compiler.assume_constant_result(fn))
        return marked[0](*args)

    return call


@_compile_constant
def _arg_names(op: str) -> tuple[str, ...]:
    """The op's argument names as its schema spells them (empty: this release has no such op). A constant to
    torch.compile, which can neither trace the schema object nor honour functools.cache."""
    return _schema_names(_namespace, op)


def _call(op: str, first: Tensor, **kwargs):
    """torch.ops.npu.<op> with the first tensor under the schema's own name and every other argument by name;
    an argument this release does not know is left out (None) or refused (anything else)."""
    names = _arg_names(op)
    unknown = [k for k, v in kwargs.items() if k not in names and v is not None]
    if unknown:
        raise TypeError(f"torch_npu.{op} of this release takes no {unknown} (its arguments: {list(names)})")
    given = {k: v for k, v in kwargs.items() if k in names}
    return getattr(_ops(), op)(**{names[0]: first}, **given)


def _product(device: torch.device) -> str:
    if _stand_in_product is not None:
        return _stand_in_product
    return torch.npu.get_device_name(device) if device.type == "npu" else ""  # type: ignore[attr-defined]


def _a2_or_a3(product: str) -> bool:
    return product.startswith(("Ascend910B", "Ascend910_93"))


def rotary_takes_b1sd(product: str, has_rotary_mode: bool) -> bool:
    """Whether npu_rotary_mul takes per-row (B1SD) cos/sin for a BNSD input. 6.x documents broadcasting on any
    axis but the last; from 7.0.0 (``rotary_mode``) B1SD is documented for Atlas A2 / A3 (Ascend910B*,
    Ascend910_93*: jit_compile=False kernels) only, the others' jit_compile=True kernels taking 11SD."""
    return _a2_or_a3(product) or not has_rotary_mode


def rotary_head_dims(product: str, has_rotary_mode: bool) -> tuple[str, Callable[[int], bool]]:
    """(rule, test) of the D npu_rotary_mul takes: 6.x a multiple of 64; from 7.0.0 an even D below 896 on
    Atlas A2 / A3 and D = 128 on the jit_compile=True kernels of the other products."""
    if not has_rotary_mode:
        return "a multiple of 64", lambda d: d % 64 == 0
    if _a2_or_a3(product):
        return "even and below 896", lambda d: d % 2 == 0 and d < 896
    return f"{ROTARY_JIT_HEAD_DIM} only", lambda d: d == ROTARY_JIT_HEAD_DIM


@_compile_constant
def _takes_b1sd(device: torch.device) -> bool:
    """rotary_takes_b1sd for this device and release; a constant to torch.compile (the device name is read
    from the driver)."""
    return rotary_takes_b1sd(_product(device), "rotary_mode" in _arg_names("npu_rotary_mul"))


def _missing(op: str) -> list[Fallback]:
    return [] if _arg_names(op) else [Fallback(f"this torch_npu has no {op}")]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _call("npu_rms_norm", x, gamma=weight, epsilon=eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, _rstd, total = _call("npu_add_rms_norm", x, x2=residual, gamma=weight, epsilon=eps)
    return y, total


ROTARY_JIT_HEAD_DIM = 128  # the only D the jit_compile=True npu_rotary_mul kernels take


def rope(x: Tensor, cos: Tensor, sin: Tensor, rot_dim: int) -> Tensor:
    """x [..., B, H, T, D] folded to the op's 4-D BNSD; partial rotary: only the rotary slice goes in. Per-row
    positions (B1SD cos/sin) run the plain reference on products whose op takes 11SD only."""
    if cos.shape[0] > 1 and not _takes_b1sd(x.device):
        return reference.rope(x, cos, sin, rot_dim)
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


def rope_fallbacks(shapes, dtype: torch.dtype, device: torch.device) -> list[Fallback]:
    if missing := _missing("npu_rotary_mul"):
        return missing
    product, has_mode = _product(device), "rotary_mode" in _arg_names("npu_rotary_mul")
    rule, takes = rotary_head_dims(product, has_mode)
    if not takes(shapes.rot_dim):  # the rotary slice is what goes in: partial rotary is a smaller D
        return [Fallback(f"npu_rotary_mul on {product or 'this product'} takes D {rule}, the model rotates "
                         f"{shapes.rot_dim} of {shapes.head_dim}")]
    if not rotary_takes_b1sd(product, has_mode):
        return [Fallback(f"per-row positions (padded rows): npu_rotary_mul on {product or 'this product'} takes "
                         "11SD cos/sin only", whole_op=False)]
    return []


# vllm-ascend's compressed causal mask for sparse_mode 3 (rightDownCausal): the op reads the diagonal band it
# needs from this fixed 2048 x 2048 upper triangle (True = masked) instead of a [B, 1, T, S] mask per call.
CAUSAL_MASK_SIZE = 2048
_causal_masks: dict[torch.device, Tensor] = {}


def _compressed_causal_mask(device: torch.device) -> Tensor:
    mask = _causal_masks.get(device)
    if mask is None:
        mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device).triu(1)
        _causal_masks[device] = mask
    return mask


def _whole_cache(t: Tensor) -> Tensor:
    """The KV cache a decode step's [B, H, S, D] key / value slice was cut from ([B, H, S_max, D], no copy):
    the slice's own strides say how long the cache is. A tensor that is not such a slice comes back as it is."""
    b, h, s, d = t.shape
    stride = t.stride()
    if stride[3] != 1 or stride[2] != d or stride[1] % d or stride[0] != h * stride[1]:
        return t
    whole = stride[1] // d
    if whole <= s:
        return t
    if not torch.compiler.is_compiling() and (t.storage_offset() + b * stride[0]
                                              > t.untyped_storage().nbytes() // t.element_size()):
        return t
    return t.as_strided((b, h, whole, d), stride)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, pse: Tensor | None, atten_mask: Tensor | None,
                     sparse_mode: int, kv_lengths: list[int] | None) -> Tensor:
    bsz, heads, _t, d = q.shape
    names = _arg_names("npu_fused_infer_attention_score")
    scale = {"scale" if "scale" in names else "scale_value": 1.0 / math.sqrt(d)}
    out, _lse = _call("npu_fused_infer_attention_score", q.contiguous(), key=k, value=v,
                      pse_shift=pse, atten_mask=atten_mask, actual_seq_lengths_kv=kv_lengths, num_heads=heads,
                      num_key_value_heads=k.shape[1], input_layout="BNSD", sparse_mode=sparse_mode, **scale)
    return out


def _masks(q: Tensor, mask: Tensor | None, s: int) -> tuple[Tensor | None, Tensor | None]:
    """(atten_mask, pse_shift) from the table's mask: bool True where visible, or an additive ALiBi bias."""
    bsz, heads, t, _d = q.shape
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return (~mask).expand(bsz, 1, t, s).contiguous(), None
    blocked = torch.isneginf(mask)
    pse = mask.masked_fill(blocked, 0.0).to(q.dtype).expand(-1, heads, t, s).contiguous()
    return blocked[:, :1].expand(bsz, 1, t, s).contiguous(), pse


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """npu_fused_infer_attention_score in BNSD, the plain form: a full [B, 1, T, S] mask (sparse_mode 0) and
    contiguous copies of K and V. ALiBi goes in as pse_shift (the bias without its -inf entries, which become
    the mask). What the cheaper forms fall back to when they fail the self-check."""
    s = k.shape[2]
    if causal:
        t = q.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]
    atten_mask, pse = _masks(q, mask, s)
    return _fused_attention(q, k.contiguous(), v.contiguous(), pse, atten_mask, 0, None)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """The causal case as sparse_mode 3 (rightDownCausal: query i sees keys up to S - T + i, the table's
    causal) with the compressed 2048 x 2048 mask; a given mask as ``attention`` does."""
    if not causal:
        return attention(q, k, v, mask, causal)
    return _fused_attention(q, k.contiguous(), v.contiguous(), None, _compressed_causal_mask(q.device), 3, None)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """One query per row over the whole KV cache the K/V slice was cut from, its length given as
    ``actual_seq_lengths_kv``: no copy of each layer's K/V every step. The mask is widened to the cache with
    the unused slots masked."""
    s = k.shape[2]
    k_all, v_all = _whole_cache(k), _whole_cache(v)
    if k_all is k or v_all is v or causal:
        return attention(q, k, v, mask, causal)
    atten_mask, pse = _masks(q, mask, s)
    extra = k_all.shape[2] - s
    if atten_mask is not None:
        atten_mask = torch.nn.functional.pad(atten_mask, (0, extra), value=True)
    if pse is not None:
        pse = torch.nn.functional.pad(pse, (0, extra))
    return _fused_attention(q, k_all, v_all, pse, atten_mask, 0, [s] * q.shape[0])


def attention_fallbacks(shapes, dtype: torch.dtype, device: torch.device) -> list[Fallback]:
    if missing := _missing("npu_fused_infer_attention_score"):
        return missing
    if dtype not in (torch.float16, torch.bfloat16):
        return [Fallback(f"npu_fused_infer_attention_score takes fp16 / bf16 only, the model runs "
                         f"{str(dtype).replace('torch.', '')}")]
    return []


def gated_mlp(gate: Tensor, up: Tensor) -> Tensor:
    """npu_swiglu takes gate and up concatenated in that order."""
    return _call("npu_swiglu", torch.cat((gate, up), dim=-1), dim=-1)


def _needs(op: str):
    return lambda shapes, dtype, device: _missing(op)


FIA = "torch_npu.npu_fused_infer_attention_score"
register("rms_norm", "npu", "torch_npu.npu_rms_norm", rms_norm, fallbacks=_needs("npu_rms_norm"))
register("add_rms_norm", "npu", "torch_npu.npu_add_rms_norm", add_rms_norm, fallbacks=_needs("npu_add_rms_norm"))
register("rope", "npu", "torch_npu.npu_rotary_mul", rope, fallbacks=rope_fallbacks)
register("prefill_attention", "npu", f"{FIA} (causal: sparse_mode 3)", prefill_attention,
         fallbacks=attention_fallbacks, safer=(f"{FIA} (full mask)", attention))
register("decode_attention", "npu", f"{FIA} (whole cache, actual_seq_lengths_kv)", decode_attention,
         fallbacks=attention_fallbacks, safer=(f"{FIA} (contiguous K/V)", attention))
register("gated_mlp", "npu", "torch_npu.npu_swiglu", gated_mlp, fallbacks=_needs("npu_swiglu"))
