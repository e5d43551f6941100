"""Where kernels register: the ops, the plain references and the fused implementations per device type.

Kept apart from table.py so that the implementation modules (torch_fused.py, npu.py, plugins) can register
on import while table.py imports them at its top, with no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import reference

OPS: tuple[str, ...] = ("rms_norm", "add_rms_norm", "rope", "prefill_attention", "decode_attention", "gated_mlp",
                         "linear")
# The quantized linears' matmuls: (x [M, k], QuantLinear) -> y [M, n] before the float bias. npuinfer.quant
# registers their plain references (dequantize-then-matmul) and its own kernels; a plugin replaces one like any op.
QUANT_OPS: tuple[str, ...] = ("w8a16_matmul", "w8a8_matmul")
MODES: tuple[str, ...] = ("fused", "plain")
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "npu")
PLUGIN_ENV = "NPUINFER_KERNEL_PLUGINS"
ENTRY_POINT_GROUP = "npuinfer.kernels"


@dataclass(frozen=True)
class Fallback:
    """Where a fused kernel cannot serve a model (a dtype or layout its op does not take, an op this release
    lacks): the plain reference runs instead, for the whole op or, ``whole_op=False``, for some of its calls."""

    reason: str
    whole_op: bool = True


@dataclass(frozen=True)
class Kernel:
    op: str
    name: str  # what runs, e.g. "sdpa", "torch_npu.npu_rms_norm", "plain torch"
    fn: Callable
    fused: bool
    origin: str  # the module that registered it
    # weight -> the form ``fn`` takes it in (e.g. prepacked), applied once when a model takes the kernel set
    # (model.Transformer.use_kernels), never per call; it may return the weight unchanged (a dtype it does not
    # pack). Only the "linear" op has one; ``fn`` must take both the prepared and the plain weight.
    prepare: Callable | None = None
    # (KernelShapes, dtype, torch.device) -> [Fallback]: what of the model this kernel cannot serve (check.py
    # runs the plain reference there and says so in the kernel column instead of stopping the run)
    fallbacks: Callable | None = None
    # a plainer form of the same op, used when this one fails its self-check (e.g. a full mask instead of
    # the op's compressed causal one)
    safer: "Kernel | None" = None

    def prepared(self, weight):
        """``weight`` in the form ``fn`` takes it (``prepare``'s result; unchanged where there is none)."""
        return weight if self.prepare is None else self.prepare(weight)

    @property
    def label(self) -> str:
        own = self.origin.startswith("npuinfer.")
        return self.name if own or not self.fused else f"{self.name} ({self.origin})"


PLAIN: dict[str, Kernel] = {
    op: Kernel(op, "plain torch", getattr(reference, op if "attention" not in op else "attention"), False,
               reference.__name__)
    for op in OPS
}
_FUSED: dict[tuple[str, str], Kernel] = {}


def register(op: str, device_type: str, name: str, fn: Callable, prepare: Callable | None = None,
             fallbacks: Callable | None = None, safer: tuple[str, Callable] | None = None) -> None:
    """Make ``fn`` the fused ``op`` on ``device_type`` (replacing an earlier registration); ``prepare``,
    ``fallbacks``: see ``Kernel``; ``safer``: (name, fn) of the form used when ``fn`` fails its self-check."""
    if op not in OPS + QUANT_OPS:
        raise ValueError(f"kernel op: expected one of {', '.join(OPS + QUANT_OPS)}, got {op!r}")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"kernel device type: expected one of {', '.join(DEVICE_TYPES)}, got {device_type!r}")
    plainer = None if safer is None else Kernel(op, safer[0], safer[1], True, _origin(safer[1]), prepare, fallbacks)
    _FUSED[(op, device_type)] = Kernel(op, name, fn, True, _origin(fn), prepare, fallbacks, plainer)


def register_default(op: str, device_type: str, name: str, fn: Callable,
                     safer: tuple[str, Callable] | None = None) -> None:
    """npuinfer's own kernel for a quantized matmul: registered unless a plugin already registered one."""
    if (op, device_type) not in _FUSED:
        register(op, device_type, name, fn, safer=safer)


def register_plain(op: str, name: str, fn: Callable) -> None:
    """The plain reference of a quantized matmul (the other ops' are kernels/reference.py's)."""
    if op not in QUANT_OPS:
        raise ValueError(f"plain references are registered for {', '.join(QUANT_OPS)} only, got {op!r}")
    PLAIN[op] = Kernel(op, name, fn, False, _origin(fn))


def _origin(fn: Callable) -> str:
    return getattr(fn, "__module__", "?") or "?"
