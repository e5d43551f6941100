"""The one rule for the weight files a loader opens, float or quantized: an index's entries are file names
inside the model directory (relative, no '..'), and every weight file, named by an index or found by its
fixed name, is a regular file. A symlink among them may point anywhere (the Hugging Face cache links each
snapshot's files to blobs beside the snapshot), as long as what it points to is a regular file: never a
device, a FIFO or a directory."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from .hf_config import CheckpointError


def inside(name: str) -> bool:
    """An index's file name that stays inside the model directory: relative, no '..', no drive."""
    path = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not path.is_absolute() and ".." not in path.parts and ":" not in name


def check_weight_files(files: list[Path], named_by: Path) -> list[Path]:
    """``files`` when each is a regular file (symlinks followed); else one CheckpointError naming ``named_by``
    (the index or directory that led to them) and each file that is missing or not a regular file."""
    missing, irregular = [], []
    for path in files:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            missing.append(str(path))
            continue
        if not stat.S_ISREG(mode):
            target = os.path.realpath(path)
            irregular.append(f"{path}" + (f" -> {target}" if target != str(path) else ""))
    if missing:
        raise CheckpointError(f"{named_by} names shard files that are missing: {', '.join(missing)}")
    if irregular:
        raise CheckpointError(f"{named_by}: weight files must be regular files (a symlink may point to one): "
                              f"{', '.join(irregular)} is not")
    return files


def read_index(index: Path, model_dir: Path) -> list[Path]:
    """The weight files a ``*.index.json`` names (its ``weight_map`` values, first appearance first), each
    inside ``model_dir`` and a regular file; errors name the index and the entries refused."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    names = list(dict.fromkeys(weight_map.values()))
    outside = [name for name in names if not inside(name)]
    if outside:
        raise CheckpointError(f"{index} names weight files outside {model_dir}: {', '.join(outside)}; an index "
                              f"names files inside the model directory only (relative, no '..')")
    return check_weight_files([model_dir / name for name in names], index)
