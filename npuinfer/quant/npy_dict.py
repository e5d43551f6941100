"""The older ModelSlim output (Baichuan2 guide, ``calibrator.save(PATH)``): ``quant_weight.npy``,
``weight_scale.npy``, ``weight_offset.npy``, ``input_scale.npy``, ``input_offset.npy``, ``quant_bias.npy``,
``deq_scale.npy``, ``fp_bias.npy``, each a dict {layer name: numpy array} saved with np.save, i.e. a pickle
inside a .npy. They sit beside the float checkpoint, whose tensors fill everything not quantized.

A pickle can run any code, so these files are never read with ``np.load(allow_pickle=True)``: the pickle is
read by an unpickler that only resolves numpy's array-rebuilding functions (numpy arrays, dtypes and plain
containers); anything else is refused before it is called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..hf_config import CheckpointError
from ..weight_files import read_weights
from ..quant_files import NPY_FILES

_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


class RefusedPickle(CheckpointError):
    """A pickle asked for something other than numpy arrays and plain containers."""


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise RefusedPickle(f"{self.path}: its pickle refers to {module}.{name}; only numpy arrays and plain "
                            f"containers are read from .npy dicts (nothing in a model directory is run)")


def load_npy_dict(path: Path) -> dict[str, np.ndarray]:
    """A dict {name: array} saved by np.save, read without running code."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
        except ValueError as exc:
            raise CheckpointError(f"{path}: not a .npy file ({exc})") from None
        data = f.read()
    if not header[2].hasobject:
        raise CheckpointError(f"{path}: holds a plain {header[2]} array; expected a dict of layer name -> array")
    try:
        obj = _ArraysOnly(data, path).load()
    except RefusedPickle:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read its pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) and not v.dtype.hasobject
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a dict of layer name -> numeric numpy array")
    return obj


def read_npy_layout(model_dir: Path) -> dict[str, Tensor]:
    """Float weights of ``model_dir`` with each quantized layer's tensors replaced by the .npy dicts' ones."""
    model_dir = Path(model_dir)
    state = read_weights(model_dir)
    params: dict[str, dict[str, np.ndarray]] = {}
    for stem, param in NPY_FILES.items():
        path = model_dir / f"{stem}.npy"
        if path.is_file():
            params[param] = load_npy_dict(path)
    layers = params["weight"]
    w8a8 = "deq_scale" in params
    need = ("input_scale", "input_offset", "quant_bias", "deq_scale") if w8a8 else ("weight_scale",)
    absent = [f"{p}.npy" for p in need if p not in params]
    if absent:
        raise CheckpointError(f"{model_dir}: quant_weight.npy without {', '.join(absent)}")
    for layer, weight in layers.items():
        base = layer[: -len(".weight")] if layer.endswith(".weight") else layer
        if f"{base}.weight" not in state:
            raise CheckpointError(f"{model_dir / 'quant_weight.npy'}: layer {layer!r} is not a tensor of the float "
                                  f"checkpoint beside it")
        state[f"{base}.weight"] = torch.from_numpy(np.ascontiguousarray(weight)).to(torch.int8)
        for param, table in params.items():
            if param == "weight" or (w8a8 and param in ("weight_scale", "weight_offset")):
                continue
            if layer not in table:
                raise CheckpointError(f"{model_dir / (param + '.npy')}: has no entry for layer {layer!r}")
            tensor = torch.from_numpy(np.ascontiguousarray(table[layer]))
            if param in ("weight_scale", "weight_offset"):
                tensor = tensor.reshape(-1, 1)
            elif param in ("input_scale", "input_offset"):
                tensor = tensor.reshape(1)
            else:
                tensor = tensor.reshape(-1)
            state[f"{base}.{param}"] = tensor
        if not w8a8 and f"{base}.weight_offset" not in state:
            state[f"{base}.weight_offset"] = torch.zeros_like(state[f"{base}.weight_scale"])
        if w8a8:
            state.pop(f"{base}.bias", None)  # folded into quant_bias
    return state
