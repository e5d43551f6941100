"""Per-rank loading: rank r reads only ``part_model/{r}/`` and checks it belongs to this run.

Called by ``runtime.load_model`` when torch.distributed runs with more than one rank. A folder
is accepted only when it was cut for this rank, for this world size, from this checkpoint
(``source_checkpoint`` equals the parent directory's identity, and the config fields equal the
parent's config.json); anything else is an error that names the rank and the command to re-cut.
Tiny checkpoints (npuinfer's own cache) are cut on first use instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, checkpoint_identity, read_config, read_weights
from ..model import ModelArgs
from .layout import FORMAT, PART_DIR, TP_KEY, content_digest, part_dir
from .dist import ParallelError


def _recut(model_dir: Path, tp: int) -> str:
    return f"npuinfer cut --model-path {model_dir} --tp {tp}"


def check_part(model_dir: str | Path, config: dict, tp: int, rank: int) -> Path:
    """The folder of ``rank`` for a ``tp``-rank run of ``model_dir`` (whose config.json is ``config``)."""
    model_dir = Path(model_dir)
    parts = model_dir / PART_DIR
    where = f"rank {rank} of {tp}"
    if not parts.is_dir():
        raise ParallelError(f"{where}: {model_dir} has no {PART_DIR}/; a tensor parallel run needs the checkpoint "
                            f"cut for its ranks first: {_recut(model_dir, tp)}")
    folder = part_dir(model_dir, rank)
    if not folder.is_dir():
        found = sorted((p.name for p in parts.iterdir() if p.name.isdigit()), key=int)
        raise ParallelError(f"{where}: {folder} is missing ({PART_DIR}/ holds ranks {', '.join(found) or 'none'}); "
                            f"re-cut for {tp} ranks: {_recut(model_dir, tp)}")
    part_config = read_config(folder)
    meta = part_config.pop(TP_KEY, None)
    if not isinstance(meta, dict):
        raise ParallelError(f"{where}: {folder}/config.json has no {TP_KEY} field: not written by npuinfer cut; "
                            f"re-cut: {_recut(model_dir, tp)}")
    if meta.get("format") != FORMAT:
        raise ParallelError(f"{where}: {folder} is in shard format {meta.get('format')!r}, this npuinfer reads "
                            f"{FORMAT}; re-cut: {_recut(model_dir, tp)}")
    if meta.get("tp_size") != tp:
        raise ParallelError(f"{where}: {folder} was cut for tensor parallel size {meta.get('tp_size')}, but this run "
                            f"has {tp} ranks; re-cut with {_recut(model_dir, tp)}, or run with "
                            f"--nproc-per-node {meta.get('tp_size')} --tp {meta.get('tp_size')}")
    if meta.get("rank") != rank:
        raise ParallelError(f"{where}: {folder} holds the shard of rank {meta.get('rank')}; re-cut: "
                            f"{_recut(model_dir, tp)}")
    if part_config != config:
        what = "its config.json fields differ from the checkpoint's"
    else:
        source = _source(model_dir)
        recorded = {key: meta.get(key) for key in source}
        what = None if recorded == source else f"cut from weights {recorded}, the directory now holds {source}"
    if what:
        raise ParallelError(f"{where}: {folder} was cut from another checkpoint than {model_dir} ({what}); "
                            f"re-cut: {_recut(model_dir, tp)}")
    return folder


def _source(model_dir: Path) -> dict[str, str]:
    """The parent's weights as the cut recorded them; empty when they were removed after the cut
    (a node given only config, tokenizer and its part_model folders): then the config alone is checked."""
    try:
        return {"source_checkpoint": checkpoint_identity(model_dir), "source_digest": content_digest(model_dir)}
    except CheckpointError:
        return {}


def load_shard(model_dir: str | Path, config: dict, args: ModelArgs) -> tuple[dict[str, Tensor], dict[str, str]]:
    """This rank's canonical tensors (and their file names) for ``args.tp_size`` / ``args.tp_rank``."""
    model_dir = Path(model_dir)
    tp, rank = args.tp_size, args.tp_rank
    reject_part_dir(config, model_dir)
    folder = check_part(model_dir, config, tp, rank)
    state = read_weights(folder)
    origin = {name: f"{PART_DIR}/{rank}/{name}" for name in state}
    return state, origin


def reject_part_dir(config: dict, model_dir: str | Path) -> None:
    """A run pointed at part_model/N itself (rather than its parent) gets told where to point."""
    if TP_KEY in config:
        meta = config[TP_KEY]
        raise CheckpointError(
            f"{model_dir} is rank {meta.get('rank')} of a tensor-parallel cut (tp {meta.get('tp_size')}); point "
            f"--model-path at the directory that holds {PART_DIR}/ and run under torchrun "
            f"--nproc-per-node {meta.get('tp_size')} with --tp {meta.get('tp_size')}")


def shard_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this rank holds."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())

