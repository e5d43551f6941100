"""W8 quantized inference (W8A16 weight-only, W8A8 weights and activations) in the MindIE / msModelSlim layouts.

- scheme.py: the arithmetic (msModelSlim's formulas), used by writer, layers and reference alike
- kernels.py: which matmul each device runs, checked once against dequantize-then-matmul
- linear.py: QuantLinear, swapped in for nn.Linear after the model is built; the plan comes from the tensors
- ../quant_files.py (below the weight-file reader, which asks it): which files make a directory quantized
- layout.py: MindIE safetensors + description <-> canonical names; ``read_canonical_quantized`` is the loader hook
- npy_dict.py: the older ModelSlim .npy dicts, read with an allow-list unpickler
- ../quantize.py (beside the commands): ``npuinfer quantize`` (round-to-nearest weights, calibrated activation ranges, optional smoothing);
  it loads models through npuinfer.runtime, which imports this package, so it is not imported here
"""
from .linear import QuantLinear, describe, load_dtype, plan_from_state, prepare, swap_linears
from .scheme import SCHEMES, W8A8, W8A16

__all__ = ["QuantLinear", "SCHEMES", "W8A8", "W8A16", "describe", "load_dtype", "plan_from_state", "prepare",
           "swap_linears"]
