"""The self-check: each fused kernel against the plain reference, on the device it will run on, at the model's
shapes and dtype, on a small input; once per process for each (device, dtype, kernel, shapes)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import Tensor

from .registration import Kernel
from .table import PLAIN, KernelSet, select_kernels

# |fused - plain| <= atol + rtol * |plain| elementwise, per dtype
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}


class KernelCheckError(RuntimeError):
    """A fused kernel does not match the plain reference on this device."""


@dataclass(frozen=True)
class KernelShapes:
    """What of a model the kernels see (per tensor-parallel rank)."""

    dim: int
    heads: int  # local heads
    head_dim: int
    rot_dim: int
    intermediate: int  # local, per branch
    eps: float = 1e-6
    rms: bool = True
    rope: bool = True
    alibi: bool = False
    gated: bool = True
    kv_heads: int | None = None  # local K/V heads; None: as many as ``heads``

    @classmethod
    def from_args(cls, args) -> "KernelShapes":  # npuinfer.model.ModelArgs
        return cls(args.dim, args.n_local_heads, args.head_dim, args.rot_dim, args.local_intermediate_size,
                   args.norm_eps, args.norm == "rms", args.position == "rope", args.position == "alibi",
                   args.mlp == "swiglu", args.n_local_kv_heads)

    @property
    def k_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def uses(self, op: str) -> bool:
        if op in ("rms_norm", "add_rms_norm"):
            return self.rms
        if op == "rope":
            return self.rope
        if op == "gated_mlp":
            return self.gated
        return True


@dataclass(frozen=True)
class CheckResult:
    op: str
    kernel: str
    case: str
    shapes: str
    dtype: str
    max_abs: float
    max_rel: float
    ok: bool
    error: str | None = None

    def describe(self) -> str:
        what = f"{self.op} ({self.case}) = {self.kernel}, shapes {self.shapes}, {self.dtype}"
        if self.error:
            return f"{what}: raised {self.error}"
        return f"{what}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}"


_CHECKED: dict[tuple, CheckResult] = {}


def _rope_tables(shapes: KernelShapes, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    half = shapes.rot_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, device=positions.device, dtype=torch.float32) * 2 / shapes.rot_dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # [B|1, 1, T, rot]


def _padded_mask(bsz: int, t: int, s: int, pad: int, device) -> Tensor:
    """bool [B,1,T,S]: causal, row 0 left-padded by ``pad`` slots (each query still sees its own slot)."""
    allowed = torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None].repeat(bsz, 1, 1)
    allowed[0, :, :pad] = False
    own = torch.arange(t, device=device)
    allowed[:, own, s - t + own] = True
    return allowed.unsqueeze(1)


def _alibi_bias(heads: int, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    t, s = allowed.shape[-2:]
    slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], device=allowed.device)
    distance = (torch.arange(s, device=allowed.device)[None] - (s - t + torch.arange(t, device=allowed.device))[:, None])
    bias = slopes.view(1, -1, 1, 1) * distance.float()
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def cases(op: str, shapes: KernelShapes, device, dtype: torch.dtype, seed: int = 0, *, b: int = 2, t: int = 5,
          s: int = 9) -> Iterator[tuple[str, tuple]]:
    """(case name, arguments) of ``op`` at the model's sizes: ``b`` rows of ``t`` tokens, ``s`` keys (a small
    input by default)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    h, d = shapes.heads, shapes.head_dim
    if op == "rms_norm":
        yield "tokens", (rand(b, t, shapes.dim), 1 + rand(shapes.dim, scale=0.1), shapes.eps)
    elif op == "add_rms_norm":
        yield "tokens", (rand(b, t, shapes.dim), rand(b, t, shapes.dim), 1 + rand(shapes.dim, scale=0.1), shapes.eps)
    elif op == "rope":
        shared = torch.arange(s - t, s, device=device)[None]
        per_row = torch.stack([torch.arange(i % 4, i % 4 + t, device=device) for i in range(b)])
        for name, positions in (("shared positions", shared), ("per-row positions", per_row)):
            cos, sin = _rope_tables(shapes, positions, dtype)
            if shapes.k_heads == h:
                yield name, (rand(2, b, h, t, d), cos, sin, shapes.rot_dim)
            else:  # grouped-query attention rotates q and k apart, each [B, heads, T, D]
                yield f"q, {name}", (rand(b, h, t, d), cos, sin, shapes.rot_dim)
                yield f"k, {name}", (rand(b, shapes.k_heads, t, d), cos, sin, shapes.rot_dim)
    elif op in ("prefill_attention", "decode_attention"):
        t_q = t if op == "prefill_attention" else 1
        q, k, v = rand(b, h, t_q, d), rand(b, shapes.k_heads, s, d), rand(b, shapes.k_heads, s, d)
        padded = _padded_mask(b, t_q, s, pad=min(3, s - t_q), device=device)
        if op == "prefill_attention":
            yield "causal", (q, k, v, None, True)
        else:
            yield "unmasked", (q, k, v, None, False)
        yield "left-padded", (q, k, v, padded, False)
        if shapes.alibi:
            yield "alibi, left-padded", (q, k, v, _alibi_bias(h, padded, dtype), False)
        if op == "decode_attention":  # K/V as the model passes them: the first s slots of a longer cache
            k_cache, v_cache = rand(b, h, s + 4, d), rand(b, h, s + 4, d)
            sliced = (q, k_cache[:, :, :s], v_cache[:, :, :s])
            yield "left-padded, cache slice", (*sliced, padded, False)
            if shapes.alibi:
                yield "alibi, cache slice", (*sliced, _alibi_bias(h, padded, dtype), False)
    elif op == "gated_mlp":
        yield "tokens", (rand(b, t, shapes.intermediate), rand(b, t, shapes.intermediate))
    elif op == "linear":  # an MLP up projection's shape; decode's one row per sequence and prefill's b x t rows
        weight = rand(shapes.intermediate, shapes.dim, scale=shapes.dim ** -0.5)
        yield "decode rows", (rand(b, 1, shapes.dim), weight, None)
        yield "tokens, bias", (rand(b, t, shapes.dim), weight, rand(shapes.intermediate, scale=0.1))


def _shape_text(args: tuple) -> str:
    return ", ".join(str(list(a.shape)) for a in args if isinstance(a, Tensor))


def _outputs(value) -> list[Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def compare(op: str, fused: Callable, kernel_name: str, case: str, args: tuple, dtype: torch.dtype,
            prepare: Callable | None = None) -> CheckResult:
    """``fused`` against the plain reference on ``args``; ``prepare`` (a linear kernel's weight preparation)
    is applied to the weight the fused kernel gets, as a model's weights are."""
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    shape_text, dtype_text = _shape_text(args), str(dtype).replace("torch.", "")
    expected = _outputs(PLAIN[op].fn(*args))
    try:
        fused_args = args if prepare is None else (args[0], prepare(args[1]), *args[2:])
        got = _outputs(fused(*fused_args))
    except Exception as exc:  # an op this device or release does not support counts as a failed check
        return CheckResult(op, kernel_name, case, shape_text, dtype_text, math.inf, math.inf, False,
                           f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
    max_abs = max_rel = 0.0
    ok = len(got) == len(expected)
    for g, e in zip(got, expected):
        if g.shape != e.shape:
            return CheckResult(op, kernel_name, case, shape_text, dtype_text, math.inf, math.inf, False,
                               f"output shape {list(g.shape)}, expected {list(e.shape)}")
        g32, e32 = g.float(), e.float()
        diff = (g32 - e32).abs().nan_to_num(nan=math.inf)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / (e32.abs() + atol)).max()))
        ok = ok and bool((diff <= atol + rtol * e32.abs()).all())
    return CheckResult(op, kernel_name, case, shape_text, dtype_text, max_abs, max_rel, ok)


def _check_one(kernel: Kernel, op: str, shapes: KernelShapes, device: torch.device,
               dtype: torch.dtype) -> list[CheckResult]:
    results = []
    for case, args in cases(op, shapes, device, dtype):
        key = (str(device), dtype, op, kernel.name, kernel.origin, id(kernel.fn), id(kernel.prepare), case,
               _shape_text(args))
        if key not in _CHECKED:
            with torch.inference_mode():
                _CHECKED[key] = compare(op, kernel.fn, kernel.label, case, args, dtype, kernel.prepare)
        results.append(_CHECKED[key])
    return results


def check_kernels(kernels: KernelSet, shapes: KernelShapes, device: torch.device | str, dtype: torch.dtype,
                  raise_on_failure: bool = True) -> KernelSet:
    """``kernels`` with the results of checking each fused kernel the model uses; a failure raises
    KernelCheckError naming kernel, shapes, dtype and differences (unless ``raise_on_failure`` is False).

    Where a kernel says it cannot serve the model (``Kernel.fallbacks``) the plain reference runs that op, and
    where a kernel fails but its plainer form (``Kernel.safer``) passes, the plainer form runs; both are
    recorded in ``KernelSet.fallbacks`` (the kernel column says so) and the run goes on."""
    device = torch.device(device)
    results: list[CheckResult] = []
    chosen = dict(kernels.kernels)
    notes: list[str] = []
    for op, kernel in kernels.kernels.items():
        if not kernel.fused or not shapes.uses(op):
            continue
        limits = kernel.fallbacks(shapes, dtype, device) if kernel.fallbacks is not None else []
        whole = [f.reason for f in limits if f.whole_op]
        if whole:
            chosen[op] = PLAIN[op]
            notes.append(f"{op}: plain torch ({'; '.join(whole)})")
            continue
        notes += [f"{op}: plain torch for {f.reason}" for f in limits]
        checked = _check_one(kernel, op, shapes, device, dtype)
        failed = [r for r in checked if not r.ok]
        if failed and kernel.safer is not None:
            plainer = _check_one(kernel.safer, op, shapes, device, dtype)
            if all(r.ok for r in plainer):
                chosen[op] = kernel.safer
                notes.append(f"{op}: {kernel.safer.name}, as {kernel.name} failed its self-check "
                             f"({failed[0].case}: {failed[0].error or f'max abs diff {failed[0].max_abs:.3g}'})")
                checked = plainer
        results += checked
    failed = [r for r in results if not r.ok]
    if failed and raise_on_failure:
        atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
        lines = "\n".join(f"  {r.describe()}" for r in failed)
        raise KernelCheckError(
            f"fused kernel check failed on {device} ({str(dtype).replace('torch.', '')}): the fused kernel differs "
            f"from the plain torch reference beyond the tolerance (atol {atol:g}, rtol {rtol:g}):\n{lines}\n"
            "Run with --kernels plain to use the plain torch ops instead.")
    return replace(kernels, kernels=chosen, checks=tuple(results), fallbacks=tuple(notes))


def kernels_for(args, device: torch.device | str, dtype: torch.dtype, mode: str = "fused") -> KernelSet:
    """The checked kernel set for a model (``ModelArgs``) on ``device`` at ``dtype``."""
    device = torch.device(device)
    kernels = select_kernels(device.type, mode)
    if mode == "plain":
        return kernels
    return check_kernels(kernels, KernelShapes.from_args(args), device, dtype)


def time_call(fn: Callable, args: tuple, synchronize: Callable[[], None], repeats: int = 20) -> float:
    """Median seconds of one call (after one warm-up), the device synchronized around each."""
    fn(*args)
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
