"""Which files make a directory quantized: the MindIE / msModelSlim safetensors layout
(``quant_model_weight*.safetensors`` plus ``quant_model_description*.json``) or the older ModelSlim ``.npy``
dicts beside float weights. Detection only (no tensors read): checkpoint loading asks here which files hold a
directory's weights, so this module imports nothing of the loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .hf_config import CheckpointError
from .weight_index import check_weight_files, read_index

WEIGHT_GLOB = "quant_model_weight*.safetensors"
INDEX_GLOB = "quant_model_weight*.safetensors.index.json"
DESCRIPTION_GLOB = "quant_model_description*.json"

# ModelSlim's calibrator.save(PATH): file stem -> the canonical parameter it holds per layer
NPY_FILES = {"quant_weight": "weight", "weight_scale": "weight_scale", "weight_offset": "weight_offset",
             "input_scale": "input_scale", "input_offset": "input_offset", "quant_bias": "quant_bias",
             "deq_scale": "deq_scale"}
NPY_IGNORED_FILES = ("fp_bias",)  # the float bias quant_bias was computed from (it is folded in quant_bias)


def weight_file_name(scheme: str) -> str:
    return f"quant_model_weight_{scheme.lower()}.safetensors"


def description_file_name(scheme: str) -> str:
    return f"quant_model_description_{scheme.lower()}.json"


@dataclass(frozen=True)
class QuantFiles:
    weights: list[Path]
    description: Path


def find_quant_files(model_dir: Path) -> QuantFiles | None:
    """The MindIE files of ``model_dir``, or None when it holds none. Half a layout is an error."""
    model_dir = Path(model_dir)
    weights = sorted(model_dir.glob(WEIGHT_GLOB))
    descriptions = sorted(model_dir.glob(DESCRIPTION_GLOB))
    if not weights and not descriptions:
        return None
    if not descriptions:
        raise CheckpointError(f"{model_dir}: has {weights[0].name} but no quant_model_description*.json naming "
                              f"each tensor's type; a MindIE quantized directory holds both")
    if len(descriptions) > 1:
        raise CheckpointError(f"{model_dir}: several descriptions ({', '.join(d.name for d in descriptions)}); "
                              f"expected one quant_model_description*.json")
    indexes = sorted(model_dir.glob(INDEX_GLOB))
    if indexes:
        weights = read_index(indexes[0], model_dir)
    if not weights:
        raise CheckpointError(f"{descriptions[0]}: no {WEIGHT_GLOB} file beside it holds the tensors it describes")
    return QuantFiles(check_weight_files(weights, model_dir), descriptions[0])


def quant_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a MindIE quantized directory, or []."""
    files = find_quant_files(model_dir)
    return files.weights if files is not None else []


def npy_files(model_dir: Path) -> list[Path]:
    """The ModelSlim .npy dicts of a directory (they override the float weights beside them)."""
    return [p for stem in (*NPY_FILES, *NPY_IGNORED_FILES) if (p := Path(model_dir) / f"{stem}.npy").is_file()]


def has_npy_layout(model_dir: Path) -> bool:
    return (Path(model_dir) / "quant_weight.npy").is_file()
