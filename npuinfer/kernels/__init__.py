"""The device kernel table: per op a plain torch reference and per-device fused implementations, each fused
kernel checked against the plain one where it runs. Model code calls a `KernelSet`, never torch_npu."""
from .check import CheckResult, KernelCheckError, KernelShapes, check_kernels, kernels_for
from .registration import ENTRY_POINT_GROUP, MODES, OPS, PLAIN, PLUGIN_ENV, Fallback, Kernel, register
from .table import KernelSet, select_kernels

__all__ = ["CheckResult", "ENTRY_POINT_GROUP", "Fallback", "Kernel", "KernelCheckError", "KernelSet", "KernelShapes",
           "MODES", "OPS", "PLAIN", "PLUGIN_ENV", "check_kernels", "kernels_for", "register", "select_kernels"]
