"""The kernel table: per op a plain torch reference and, per device type, the fused implementation.

Implementations register themselves with ``register(op, device_type, name, fn)``: npuinfer's own
(torch_fused.py, npu.py) and any plugin module, named in ``$NPUINFER_KERNEL_PLUGINS`` (comma separated module
names) or installed under the ``npuinfer.kernels`` entry-point group. A later registration replaces an earlier
one for the same (op, device type), so a plugin can swap a kernel in; every fused kernel is still compared with
the plain reference before a model uses it (check.py).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Callable, Mapping

from . import npu, torch_fused  # noqa: F401  (they register on import; npu imports torch_npu only when run)
from .registration import DEVICE_TYPES, ENTRY_POINT_GROUP, MODES, OPS, PLAIN, PLUGIN_ENV, QUANT_OPS, _FUSED, Kernel

_loaded = False


class KernelPluginError(RuntimeError):
    """A module named in $NPUINFER_KERNEL_PLUGINS cannot be imported (a usage error: one line, no traceback)."""


def _load() -> None:
    """npuinfer's implementations, then the plugins (which may replace them); once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise KernelPluginError(f"environment variable {PLUGIN_ENV}: kernel plugin module {name!r} could not be "
                                    f"imported: {type(exc).__name__}: {exc} (name importable modules, comma "
                                    "separated, or unset it)") from exc
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


@dataclass(frozen=True)
class KernelSet:
    """The kernels one model runs: one per op, fused where the device has one (mode "fused"), else plain.
    ``checks`` holds the self-check results of the fused ones (check.py)."""

    mode: str
    device_type: str
    kernels: Mapping[str, Kernel]
    checks: tuple = field(default=())  # check.CheckResult
    fallbacks: tuple[str, ...] = field(default=())  # where the check put a plain or plainer kernel, and why

    @property
    def rms_norm(self) -> Callable:
        return self.kernels["rms_norm"].fn

    @property
    def add_rms_norm(self) -> Callable:
        return self.kernels["add_rms_norm"].fn

    @property
    def rope(self) -> Callable:
        return self.kernels["rope"].fn

    @property
    def prefill_attention(self) -> Callable:
        return self.kernels["prefill_attention"].fn

    @property
    def decode_attention(self) -> Callable:
        return self.kernels["decode_attention"].fn

    @property
    def graph_decode_attention(self) -> Callable:
        """Decode attention inside a captured step. On cpu the step is built by AOTInductor, which fuses the
        plain matmuls itself; cpu's flash kernel with a mask measured ~0.6 ms a layer slower there (12% of a
        130M decode step at batch 8). cuda and npu graphs replay the fused kernel."""
        return PLAIN["decode_attention"].fn if self.device_type == "cpu" else self.decode_attention

    @property
    def gated_mlp(self) -> Callable:
        return self.kernels["gated_mlp"].fn

    @property
    def linear(self) -> Callable:
        """(x, weight, bias) -> y, where weight is what the kernel's ``prepared`` made of the module's weight."""
        return self.kernels["linear"].fn

    def is_fused(self, op: str) -> bool:
        return self.kernels[op].fused

    def with_plain(self, *ops: str) -> "KernelSet":
        return replace(self, kernels={**self.kernels, **{op: PLAIN[op] for op in ops}})

    @property
    def label(self) -> str:
        """"fused" or "plain": the --kernels value, a row's ``kernels`` column."""
        return self.mode

    def describe(self) -> dict[str, str]:
        """op -> implementation, for metadata."""
        return {op: k.label for op, k in self.kernels.items()}

    def check_summary(self) -> str:
        """One line for metadata: the self-check's outcome and largest differences."""
        if self.mode == "plain":
            return "not needed (plain)"
        fallbacks = "".join(f"; {note}" for note in self.fallbacks)
        if not self.checks:
            return f"no fused kernel on this device{fallbacks}"
        worst_abs = max(c.max_abs for c in self.checks)
        worst_rel = max(c.max_rel for c in self.checks)
        return f"ok: {len(self.checks)} cases, max abs {worst_abs:.2g}, max rel {worst_rel:.2g}{fallbacks}"


def select_kernels(device_type: str, mode: str = "fused") -> KernelSet:
    """The kernel set for a device type, unchecked (``check.kernels_for`` checks it)."""
    if mode not in MODES:
        raise ValueError(f"--kernels: expected one of {', '.join(MODES)}, got {mode!r}")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"kernel device type: expected one of {', '.join(DEVICE_TYPES)}, got {device_type!r}")
    _load()
    chosen = {op: (_FUSED.get((op, device_type), PLAIN[op]) if mode == "fused" else PLAIN[op]) for op in OPS}
    return KernelSet(mode, device_type, chosen)


def matmul_candidates(op: str, device_type: str, mode: str = "fused") -> tuple[list[Kernel], Kernel]:
    """A quantized matmul's kernels to try on ``device_type``, best first (the registered one, then its plainer
    form), none for --kernels plain; and the plain reference every candidate is checked against and that runs
    where none passes."""
    if op not in QUANT_OPS:
        raise ValueError(f"quantized matmul op: expected one of {', '.join(QUANT_OPS)}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"--kernels: expected one of {', '.join(MODES)}, got {mode!r}")
    _load()
    fused = _FUSED.get((op, device_type)) if mode == "fused" else None
    candidates = [] if fused is None else [fused] + ([fused.safer] if fused.safer is not None else [])
    return candidates, PLAIN[op]
