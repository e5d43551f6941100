"""torch_npu's ops as a stand-in on cpu: each op npuinfer calls registered with torch.library under the schema
a torch_npu release declares (tests/data/torch_npu_schemas.json, copied from Ascend/op-plugin), in a
namespace of its own, with npuinfer's plain torch references as bodies (and as fake implementations, so
torch.compile traces them). A call binds to these exactly as to torch.ops.npu on a device: by the schema's
argument names; the bodies also refuse what the documentation says the op does not take (fp32 attention,
non-contiguous attention inputs, a B1SD cos/sin on a product that takes 11SD only, ...)."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from npuinfer.kernels import npu, reference
from npuinfer.quant.scheme import decode_deq_scale

SCHEMAS_FILE = Path(__file__).parent / "data" / "torch_npu_schemas.json"

# c10::ScalarType values: a schema's ``int? output_dtype`` (26.0.0) receives a torch.dtype as this number
_SCALAR_TYPES = {1: torch.int8, 3: torch.int32, 5: torch.float16, 6: torch.float32, 15: torch.bfloat16}


def releases() -> dict[str, dict]:
    return json.loads(SCHEMAS_FILE.read_text())["releases"]


def distinct_releases() -> list[str]:
    """The first release of each run of releases whose schemas (of the ops npuinfer calls) are the same."""
    seen, firsts = set(), []
    for name, release in releases().items():
        key = json.dumps(release["schemas"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            firsts.append(name)
    return firsts


def _arguments(schema: str) -> list[tuple[str, str | None]]:
    """(name, default text or None) of each argument of a schema string."""
    inner = schema[schema.index("(") + 1: schema.rindex(") ->")]
    out = []
    for part in re.split(r",\s*(?![^\[]*\])", inner):
        part = part.strip()
        if part == "*":
            continue
        decl, _, default = part.partition("=")
        out.append((decl.split()[-1], default or None))
    return out


def _to_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return _SCALAR_TYPES[int(value)]


class StandInError(RuntimeError):
    """A call the real op refuses by its documentation."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise StandInError(what)


def rms_norm(a: dict, product: str):
    x, gamma, eps = a["self"], a["gamma"], a["epsilon"]
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return reference.rms_norm(x, gamma, eps), rstd


def add_rms_norm(a: dict, product: str):
    y, total = reference.add_rms_norm(a["x1"], a["x2"], a["gamma"], a["epsilon"])
    rstd = torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + a["epsilon"])
    return y, rstd, total


def rotary_mul(a: dict, product: str):
    x, r1, r2 = a["self"], a["r1"], a["r2"]
    _check(a.get("rotary_mode", "half") == "half", f"rotary_mode {a.get('rotary_mode')!r}")
    _check(x.dim() == 4 and r1.dim() == 4 and r1.shape == r2.shape, f"npu_rotary_mul: 4-D BNSD input and r1/r2 "
           f"expected, got {list(x.shape)}, {list(r1.shape)}")
    b, _n, s, d = x.shape
    b1sd = npu.rotary_takes_b1sd(product, "rotary_mode" in a)
    _check(r1.shape[1] == 1 and r1.shape[2] == s and r1.shape[3] == d and r1.shape[0] in ((1, b) if b1sd else (1,)),
           f"npu_rotary_mul on {product}: r1/r2 {list(r1.shape)} for a BNSD input {list(x.shape)} "
           f"({'11SD or B1SD' if b1sd else '11SD only'})")
    rule, takes = npu.rotary_head_dims(product, "rotary_mode" in a)
    _check(takes(d), f"npu_rotary_mul on {product}: D {rule}, got {d}")
    return reference.rope(x, r1, r2, d)


def swiglu(a: dict, product: str):
    gate, up = a["self"].chunk(2, dim=a["dim"])
    return reference.gated_mlp(gate, up)


def fused_infer_attention_score(a: dict, product: str):
    q, k, v = a["query"], a["key"], a["value"]
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check(t.dtype in (torch.float16, torch.bfloat16), f"{name}: fp16 / bf16 only, got {t.dtype}")
        _check(t.is_contiguous(), f"{name}: non-contiguous tensors are not supported")
    _check(a["input_layout"] == "BNSD", f"input_layout {a['input_layout']!r} (npuinfer passes BNSD)")
    b, heads, t, d = q.shape
    s = k.shape[2]
    _check(a["num_heads"] == heads, f"num_heads {a['num_heads']} but query has {heads}")
    kv_heads = a["num_key_value_heads"] or heads
    _check(kv_heads == k.shape[1] == v.shape[1] and heads % kv_heads == 0, f"num_key_value_heads {kv_heads}")
    visible = torch.ones(b, 1, t, s, dtype=torch.bool, device=q.device)
    lengths = a["actual_seq_lengths_kv"]
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        _check(len(lengths) in (1, b), f"actual_seq_lengths_kv of {len(lengths)} for batch {b}")
        _check(all(0 < n <= s for n in lengths), f"actual_seq_lengths_kv {lengths} beyond the key's {s}")
        kv_len = torch.tensor(lengths * (b if len(lengths) == 1 else 1), device=q.device)
        visible = visible & (torch.arange(s, device=q.device)[None, :] < kv_len[:, None])[:, None, None, :]
    else:
        kv_len = torch.full((b,), s, device=q.device)
    mask, mode = a["atten_mask"], a["sparse_mode"]
    if not is_fake(q):  # which form ran: the conformance test asserts the cheaper ones are reached
        CALLS[f"attention sparse_mode={mode}" + (", actual_seq_lengths_kv" if lengths is not None else "")] += 1
    if t == 1:
        mode = 0  # the incremental branch ignores sparse_mode
    if mode == 3:  # rightDownCausal: query i sees keys j <= kv_len - t + i, the mask its compressed form
        _check(mask is not None and mask.dtype == torch.bool and tuple(mask.shape[-2:]) == (2048, 2048)
               and mask.dim() <= 4 and mask.numel() == 2048 * 2048, "sparse_mode 3 takes the (2048, 2048) mask")
        _check(is_fake(mask) or torch.equal(mask.reshape(2048, 2048).cpu(),
                                            torch.ones(2048, 2048, dtype=torch.bool).triu(1)),
               "sparse_mode 3: the mask must be triu(ones(2048, 2048), 1)")
        j = torch.arange(s, device=q.device)
        i = torch.arange(t, device=q.device)
        visible = visible & (j[None, None, :] <= kv_len[:, None, None] - t + i[None, :, None])[:, None]
    elif mode == 0:
        if mask is not None:
            _check(mask.dtype == torch.bool, f"atten_mask dtype {mask.dtype} (npuinfer passes bool)")
            _check(mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == t and mask.shape[3] == s
                   and mask.shape[0] in (1, b) and mask.is_contiguous(),
                   f"atten_mask {list(mask.shape)}: (B|1, 1, Q_S={t}, KV_S={s}) contiguous expected")
            visible = visible & ~mask
    else:
        raise StandInError(f"sparse_mode {mode} (npuinfer passes 0 or 3)")
    bias = torch.zeros(b, heads, t, s, dtype=torch.float32, device=q.device)
    pse = a["pse_shift"]
    if pse is not None:
        _check(pse.dtype == q.dtype and pse.is_contiguous() and pse.shape[-3:] == (heads, t, s),
               f"pse_shift {list(pse.shape)} {pse.dtype}")
        bias = bias + pse.float()
    bias = bias.masked_fill(~visible, float("-inf"))
    _check(abs(a["scale"] - 1.0 / d ** 0.5) < 1e-6, f"scale {a['scale']} (npuinfer's is 1/sqrt(D))")
    out = reference.attention(q.float(), k.float(), v.float(), bias, False).to(q.dtype)
    return out, torch.zeros(1, dtype=torch.float32, device=q.device)


def weight_quant_batchmatmul(a: dict, product: str):
    x, weight, scale, offset = a["x"], a["weight"], a["antiquant_scale"], a["antiquant_offset"]
    _check(weight.dtype == torch.int8 and scale.dtype == x.dtype, "int8 weight, antiquant_scale in x's dtype")
    w = weight.to(x.dtype) if offset is None else weight.to(x.dtype) + offset
    y = x @ (w * scale)
    return y if a["bias"] is None else y + a["bias"]


def trans_quant_param(a: dict, product: str):
    # the fp32 scale's bits in the low 32 of an int64, as MindIE stores deq_scale for fp16 models
    return a["scale"].float().view(torch.int32).to(torch.int64)


def quant_matmul(a: dict, product: str):
    x1, x2, scale = a["x1"], a["x2"], a["scale"]
    out = _to_dtype(a["output_dtype"])
    _check(x1.dtype == torch.int8 and x2.dtype == torch.int8, "int8 x1, x2")
    _check(out in (torch.float16, torch.bfloat16), f"output_dtype {out}")
    _check(scale.dtype == (torch.int64 if out == torch.float16 else torch.float32),
           f"scale {scale.dtype} for output {out}: int64 (npu_trans_quant_param) for fp16, fp32 for bf16")
    acc = x1.float() @ x2.float()  # exact while the sums stay below 2^24
    if a["bias"] is not None:
        acc = acc + a["bias"].float()
    return (acc * decode_deq_scale(scale)).to(out)


BODIES = {"npu_rms_norm": rms_norm, "npu_add_rms_norm": add_rms_norm, "npu_rotary_mul": rotary_mul,
          "npu_swiglu": swiglu, "npu_fused_infer_attention_score": fused_infer_attention_score,
          "npu_weight_quant_batchmatmul": weight_quant_batchmatmul, "npu_trans_quant_param": trans_quant_param,
          "npu_quant_matmul": quant_matmul}


@dataclass
class StandIn:
    release: str
    namespace: str
    library: torch.library.Library


_REGISTERED: dict[str, StandIn] = {}


def _default(text: str | None):
    if text is None:
        return None
    text = text.strip()
    if text in ("None",):
        return None
    if text in ("True", "False"):
        return text == "True"
    if text[0] in "'\"":
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        return float(text)


CALLS: Counter[str] = Counter()  # op -> calls that reached a body (eager, or a compiled graph's run)


def _impl(op: str, schema: str, product_of):
    names = [(name, _default(default)) for name, default in _arguments(schema)]

    def call(*args, **kwargs):
        bound = {name: default for name, default in names}
        bound.update(zip((n for n, _ in names), args))
        bound.update(kwargs)
        if not is_fake(next(v for v in bound.values() if isinstance(v, Tensor))):
            CALLS[op] += 1
        return BODIES[op](bound, product_of())  # looked up per call: a test may swap a body

    return call


_product = {"name": "Ascend910B3"}


def register(release: str) -> StandIn:
    """The ops of ``release`` under ``torch.ops.npuinfer_npu_<release>`` (registered once per process)."""
    if release in _REGISTERED:
        return _REGISTERED[release]
    namespace = "npuinfer_npu_" + re.sub(r"\W", "_", release)
    library = torch.library.Library(namespace, "DEF")
    for op, schema in releases()[release]["schemas"].items():
        library.define(schema)
        fn = _impl(op, schema, lambda: _product["name"])
        library.impl(op, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{namespace}::{op}", fn, lib=library)
    _REGISTERED[release] = StandIn(release, namespace, library)
    return _REGISTERED[release]


def use(release: str, product: str):
    """npuinfer's npu kernels calling ``release``'s stand-in ops, as on ``product``."""
    stand_in = register(release)
    _product["name"] = product
    return npu.stand_in(stand_in.namespace, product)
