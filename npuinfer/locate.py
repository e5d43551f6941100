"""Where a model's checkpoint is: a registry name, --model-path or $NPUINFER_MODELS_DIR/<name>, checked before
anything is loaded so that a missing or unusable checkpoint is one clear message (runtime and dummy use it)."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_files, read_model_config
from .options import RunConfig
from .parallel.layout import PART_DIR
from .registry import DEFAULT_MODEL, ModelNotFound, ModelSpec, get_spec, models_dir
from .tiny import ensure_tiny


def resolve_model_dir(name: str, model_path: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory for a registry name (tiny ones are built on first use)."""
    spec = get_spec(name)
    if model_path is not None:
        return Path(model_path)
    if spec.tiny:
        return ensure_tiny(name)
    base = models_dir()
    if base is not None and (base / name).is_dir():
        return base / name
    where = f"$NPUINFER_MODELS_DIR/{name} ({base / name} does not exist)" if base else "$NPUINFER_MODELS_DIR/<name>"
    raise ModelNotFound(
        f"model {name!r} needs its checkpoint directory: pass --model-path DIR, or put the download at {where}. "
        f"Without the weights: --dummy-weights runs {name} at its real size on seeded random weights (for timing; "
        f"its text is noise), or try the harness on the tiny stand-in --model {spec.stand_in}"
    )


class ModelUnavailable(LookupError):
    """A model named on the command line has no usable checkpoint: the message says what was looked for,
    what was wrong with it, and the stand-in to try instead."""


def locate_model(name: str | None, model_path: str | Path | None = None, *, tp: int = 1,
                 dummy_weights: bool = False) -> Path | None:
    """Where a model's checkpoint is, checked before anything is loaded (config.json read, weight files
    present, no tensor read): the one place a session start or ``npuinfer infer`` asks. None for a tiny
    model without ``model_path`` (built on first use). Raises ModelUnavailable.

    ``dummy_weights``: a real name whose checkpoint is missing runs on random weights of its real size
    (--dummy-weights, npuinfer.dummy).
    """
    if name is None and model_path is None:
        raise ModelUnavailable("give a model name (--model) or a checkpoint directory (--model-path)")
    try:
        spec = get_spec(name) if name is not None else None
    except ModelNotFound as exc:
        raise ModelUnavailable(str(exc)) from None
    if model_path is not None:
        return _checked_dir(Path(model_path), spec, tp, f"--model-path {model_path}")
    if spec.tiny:
        return None
    base = models_dir()
    if base is not None and (base / spec.name).is_dir():
        return _checked_dir(base / spec.name, spec, tp, f"$NPUINFER_MODELS_DIR/{spec.name}")
    if dummy_weights:
        return None
    try:
        resolve_model_dir(spec.name)  # the registry's own message: both places looked at, and the stand-in
    except ModelNotFound as exc:
        raise ModelUnavailable(str(exc)) from None
    raise AssertionError("resolve_model_dir found a directory locate_model did not")  # pragma: no cover


def locate_config(config: RunConfig) -> Path | None:
    """``locate_model`` for a RunConfig: its model, --model-path, --tp and --dummy-weights."""
    return locate_model(config.model, config.model_path, tp=config.tp, dummy_weights=config.dummy_weights)


def _checked_dir(model_dir: Path, spec: ModelSpec | None, tp: int, looked_at: str) -> Path:
    """``model_dir`` if it holds a checkpoint of ``spec``'s family and size, else ModelUnavailable."""
    try:
        read_model_config(model_dir, spec)
        if not (tp > 1 and (model_dir / PART_DIR).is_dir()):  # tp nodes may hold only their part_model/ shards
            checkpoint_files(model_dir)
    except CheckpointError as exc:
        stand_in = spec.name if spec is not None and spec.tiny else (spec.stand_in if spec is not None else None)
        hint = (f"the tiny stand-in --model {stand_in}" if stand_in
                else f"a tiny stand-in such as --model {DEFAULT_MODEL} (without --model-path)")
        raise ModelUnavailable(f"{looked_at}: not a usable checkpoint: {exc}. To try the harness without "
                               f"weights use {hint}") from None
    return model_dir
