"""Per-question cache: cache.csv + cache_meta.json, resumable, with part files for xdist workers.

A row is appended and flushed as each question is scored, so a crashed run resumes from
``scored_ids()``. The settings the rows were produced with live in cache_meta.json; opening a
cache with other settings is refused, so rows from two configurations are never mixed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npuinfer.ceval.dataset import CHOICES
from npuinfer.ceval.scored import FIELDS, ScoredRow
from npuinfer.ceval.subjects import official_order

CACHE_FORMAT_VERSION = 1
CACHE_FILE = "cache.csv"
META_FILE = "cache_meta.json"
# Settings added to ``extra`` after caches were written without them, with the value those caches imply.
IMPLIED_EXTRA: dict[str, Any] = {"fit": "shots"}
# Keys of cache_meta.json that record what a run found (run.record_prompt_fit), not settings it was asked for.
PROMPT_FIT = "prompt_fit"
RUN_RECORDS: tuple[str, ...] = (PROMPT_FIT,)
_PART_RE = re.compile(r"^cache\.part-([A-Za-z0-9_.-]+)\.csv$")
_WORKER_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class CacheError(ValueError):
    """The cache directory holds rows from other settings, another format, or a broken file."""


@dataclass(frozen=True)
class CacheSettings:
    model: str
    checkpoint: str  # identity of the weights (hash, revision, path + mtime: the caller decides)
    template: str
    shots: int
    dtype: str
    split: str
    extra: Mapping[str, Any] = field(default_factory=dict)  # anything else that changes results

    def to_meta(self) -> dict[str, Any]:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "template": self.template,
            "shots": self.shots,
            "dtype": self.dtype,
            "split": self.split,
            "extra": dict(self.extra),
        }


def part_path(cache_dir: str | os.PathLike, worker: str) -> Path:
    if not _WORKER_RE.match(worker):
        raise ValueError(f"worker id {worker!r} must match {_WORKER_RE.pattern}")
    return Path(cache_dir) / f"cache.part-{worker}.csv"


def part_files(cache_dir: str | os.PathLike) -> list[Path]:
    d = Path(cache_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _PART_RE.match(p.name))


def _atomic_write(path: Path, text: str) -> None:
    # A name of its own per process: xdist workers may write the same file at the same moment.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _create_once(path: Path, text: str) -> bool:
    """Write path unless it exists (atomically, even against other processes); True when written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def read_meta(cache_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(cache_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CacheError(f"{path}: expected a JSON object")
    return meta


def _check_format(meta: Mapping[str, Any], path: Path) -> None:
    version = meta.get("format_version")
    if version == CACHE_FORMAT_VERSION:
        return
    is_int = isinstance(version, int) and not isinstance(version, bool)
    if is_int and version < CACHE_FORMAT_VERSION:
        why = f"an older cache format (version {version})"
    else:
        why = f"an unknown cache format (format_version {version!r})"
    raise CacheError(
        f"{path}: {why}; this npuinfer reads and writes version {CACHE_FORMAT_VERSION}. "
        "Score into a new directory; rows of different formats are never mixed."
    )


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in [*old, *(k for k in new if k not in old)]:
        if key == "extra" or key in RUN_RECORDS:
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} in the cache, {new.get(key)!r} now")
    old_extra, new_extra = ({**IMPLIED_EXTRA, **(meta.get("extra") or {})} for meta in (old, new))
    for key in [*old_extra, *(k for k in new_extra if k not in old_extra)]:
        if old_extra.get(key) != new_extra.get(key):
            diffs.append(
                f"extra.{key}: {old_extra.get(key)!r} in the cache, {new_extra.get(key)!r} now"
            )
    return diffs


def open_meta(cache_dir: str | os.PathLike, settings: CacheSettings) -> None:
    """Record the settings of a new cache, or check them against an existing one."""
    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / META_FILE
    new = settings.to_meta()
    # Rows are looked for before the meta file: a writer creates the meta file before any rows, so
    # rows seen here with no meta file after them were not written by a concurrent worker of this run.
    has_rows = (d / CACHE_FILE).exists() or bool(part_files(d))
    if not path.exists():
        if has_rows:
            raise CacheError(
                f"{d}: cache rows without {META_FILE}: unknown settings and format, refusing to "
                "add to them. Score into a new directory."
            )
        if _create_once(path, json.dumps(new, ensure_ascii=False, indent=2) + "\n"):
            return
    old = read_meta(d)
    _check_format(old, path)
    diffs = _settings_diff(old, new)
    if diffs:
        raise CacheError(
            f"{path}: the cache was written with other settings ({'; '.join(diffs)}). "
            "Score into a new directory; rows from different settings are never mixed."
        )


def record_in_meta(cache_dir: str | os.PathLike, key: str, entries: Mapping[str, Any],
                   order: Callable[[str], Any] | None = None) -> None:
    """Merge ``entries`` into the run record ``key`` (one of RUN_RECORDS) of an existing cache_meta.json, its
    entries sorted by ``order`` (so the bytes do not depend on the order cases finished in)."""
    if key not in RUN_RECORDS:
        raise ValueError(f"{key!r} is not a run record of {META_FILE} ({', '.join(RUN_RECORDS)})")
    d = Path(cache_dir)
    meta = read_meta(d)
    merged = {**(meta.get(key) or {}), **entries}
    meta[key] = {k: merged[k] for k in sorted(merged, key=order)}
    _atomic_write(d / META_FILE, json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def _row_from_fields(fields: list[str], where: str) -> ScoredRow:
    if len(fields) != len(FIELDS):
        raise CacheError(f"{where}: {len(fields)} fields, expected {len(FIELDS)}")
    subject, qid, answer, prediction, correct = fields
    if not subject or not qid:
        raise CacheError(f"{where}: empty subject or question_id")
    if answer not in ("", *CHOICES):
        raise CacheError(f"{where}: answer {answer!r} is not empty or one of A, B, C, D")
    expected = "" if answer == "" else ("1" if prediction == answer else "0")
    if correct != expected:
        raise CacheError(
            f"{where}: correct is {correct!r} but answer {answer!r} and prediction "
            f"{prediction!r} give {expected!r}"
        )
    return ScoredRow(
        subject, qid, answer or None, prediction, None if correct == "" else correct == "1"
    )


def _row_to_fields(row: ScoredRow) -> list[str]:
    correct = "" if row.correct is None else ("1" if row.correct else "0")
    return [row.subject, row.question_id, row.answer or "", row.prediction, correct]


def _parse(path: Path) -> tuple[list[ScoredRow], bool]:
    """Rows of one cache file, and whether it needs repair.

    A file that does not end in a newline was cut mid-write by a crash: its last row is kept
    when it is complete and valid, dropped otherwise.
    """
    text = path.read_text(encoding="utf-8")
    if not text:
        return [], True
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not records or tuple(records[0]) != FIELDS:
        got = ",".join(records[0]) if records else ""
        raise CacheError(f"{path}: row 0 (header): expected {','.join(FIELDS)}, found {got}")
    cut = not text.endswith("\n")
    rows = []
    for row_no, fields in enumerate(records[1:], start=1):
        where = f"{path}: row {row_no}"
        if cut and row_no == len(records) - 1:
            try:
                rows.append(_row_from_fields(fields, where))
            except CacheError:
                pass
        else:
            rows.append(_row_from_fields(fields, where))
    return rows, cut


def _serialize(rows: Iterable[ScoredRow]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    writer.writerows(_row_to_fields(r) for r in rows)
    return buf.getvalue()


def _read_file(path: Path) -> list[ScoredRow]:
    return _parse(path)[0] if path.exists() else []


class QuestionCache:
    """Appends scored rows to cache.csv, or to cache.part-<worker>.csv under pytest-xdist."""

    def __init__(
        self, cache_dir: str | os.PathLike, settings: CacheSettings, worker: str | None = None
    ) -> None:
        self.dir = Path(cache_dir)
        self.settings = settings
        open_meta(self.dir, settings)
        self.path = self.dir / CACHE_FILE if worker is None else part_path(self.dir, worker)
        rows: list[ScoredRow] = []
        if self.path.exists():
            rows, needs_repair = _parse(self.path)
            if needs_repair:
                _atomic_write(self.path, _serialize(rows))
        else:
            _atomic_write(self.path, _serialize([]))
        self._keys = {r.key for r in rows}
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")

    def scored_rows(self, subject: str | None = None) -> dict[tuple[str, str], ScoredRow]:
        """Rows already scored (of one subject, or all), in cache.csv or any worker's part file.

        On a key found in several files cache.csv wins, then the parts in name order, as in merge_parts.
        """
        return {k: r for k, r in self.snapshot(self.dir).items() if subject is None or r.subject == subject}

    @staticmethod
    def snapshot(directory: str | os.PathLike) -> dict[tuple[str, str], ScoredRow]:
        """Rows already scored in a cache directory, read without opening it for writing."""
        rows: dict[tuple[str, str], ScoredRow] = {}
        directory = Path(directory)
        for path in [directory / CACHE_FILE, *part_files(directory)]:
            for r in _read_file(path):
                rows.setdefault(r.key, r)
        return rows

    def scored_ids(self) -> set[tuple[str, str]]:
        """(subject, question_id) already scored, in cache.csv or any worker's part file."""
        return set(self.scored_rows())

    def add(self, row: ScoredRow) -> None:
        if row.key in self._keys:
            raise CacheError(f"{self.path}: {row.subject} id {row.question_id} is already scored")
        self._keys.add(row.key)
        self._writer.writerow(_row_to_fields(row))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> QuestionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _id_key(qid: str) -> tuple[int, int, str]:
    return (0, int(qid), qid) if qid.isdigit() else (1, 0, qid)


def sort_key(row: ScoredRow) -> tuple[Any, ...]:
    """subjects.csv order, then numeric ids numerically."""
    return (official_order(row.subject), _id_key(row.question_id))


def merge_parts(cache_dir: str | os.PathLike) -> Path:
    """Fold the part files into cache.csv and delete them; returns cache.csv.

    Rows are deduplicated on (subject, question_id), cache.csv's row winning, then the parts in
    name order; the result is sorted by sort_key. Safe to run again after a crash.
    """
    d = Path(cache_dir)
    meta_path = d / META_FILE
    _check_format(read_meta(d), meta_path)
    parts = part_files(d)
    seen: dict[tuple[str, str], ScoredRow] = {}
    for path in [d / CACHE_FILE, *parts]:
        for row in _read_file(path):
            seen.setdefault(row.key, row)
    target = d / CACHE_FILE
    _atomic_write(target, _serialize(sorted(seen.values(), key=sort_key)))
    for part in parts:
        part.unlink()
    return target


def read_cache(cache_dir: str | os.PathLike) -> list[ScoredRow]:
    """Rows of cache.csv in file order (merge_parts first when workers wrote part files)."""
    d = Path(cache_dir)
    _check_format(read_meta(d), d / META_FILE)
    path = d / CACHE_FILE
    if not path.exists():
        raise CacheError(f"{path}: not found")
    return _parse(path)[0]
