"""The ``part_model/{rank}/`` layout that ``npuinfer cut`` writes and each tensor-parallel rank reads: names and
the identity of the parent checkpoint, shared by the writer (cut.py), the reader (shard.py) and the locator."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..checkpoint import checkpoint_files

PART_DIR = "part_model"
TP_KEY = "npuinfer_tp"  # the field cut adds to each part's config.json
FORMAT = 1  # bumped when the shard layout changes; older cuts must be redone


def part_dir(model_dir: str | os.PathLike, rank: int) -> Path:
    return Path(model_dir) / PART_DIR / str(rank)


def content_digest(model_dir: Path, sample: int = 1 << 16) -> str:
    """sha256 over the start, middle and end of every weight file: tells apart checkpoints that have the
    same config and file sizes (a base and a chat model) without reading gigabytes."""
    digest = hashlib.sha256()
    for path in checkpoint_files(model_dir):
        size = path.stat().st_size
        with path.open("rb") as f:
            for offset in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
                f.seek(offset)
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]
