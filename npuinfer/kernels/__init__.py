"""The device kernel table: per op a plain torch reference and per-device fused implementations, each fused
kernel checked against the plain one where it runs. Model code calls a `KernelSet`, never torch_npu."""
from .check import CheckResult, KernelCheckError, KernelShapes, check_kernels, kernels_for
from .registration import ENTRY_POINT_GROUP, MODES, OPS, PLAIN, PLUGIN_ENV, QUANT_OPS, Fallback, Kernel, register, \
    register_default, register_plain
from .table import KernelSet, matmul_candidates, select_kernels

__all__ = ["CheckResult", "ENTRY_POINT_GROUP", "Fallback", "Kernel", "KernelCheckError", "KernelSet", "KernelShapes",
           "MODES", "OPS", "PLAIN", "PLUGIN_ENV", "QUANT_OPS", "check_kernels", "kernels_for", "matmul_candidates",
           "register", "register_default", "register_plain", "select_kernels"]
