"""Per-question cache: cache.csv + cache_meta.json, resumable, shared by concurrent runs.

A row is appended and flushed as each question is scored, so a crashed run resumes from
``scored_ids()``. The settings the rows were produced with live in cache_meta.json; opening a
cache with other settings is refused, so rows from two configurations are never mixed.

Any number of processes (xdist workers, two runs with overlapping ``-k``, ``npuinfer report``) may use
one directory at once: every read and write holds the directory's lock (filelock, ``.cache.lock``),
an append first catches up with what others wrote, and cache.csv is only ever replaced whole, under
the lock, by a writer that read and validated all of it. Every row is checked (known subject, answer
and prediction A-D, ``correct`` consistent); conflicting rows for one question are an error naming
the file and rows, identical ones collapse with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from npuinfer.atomic import create_atomic, write_atomic
from npuinfer.ceval.dataset import CHOICES
from npuinfer.ceval.rows import CEVAL_TASK, RowRules, rules_for, task_of
from npuinfer.ceval.scored import LEGACY_FIELDS, ScoredRow, format_logprobs, parse_logprobs
from npuinfer.ceval.taskdata import TaskData

CACHE_FORMAT_VERSION = 1
CACHE_FILE = "cache.csv"
META_FILE = "cache_meta.json"
# Settings added to ``extra`` after caches were written without them, with the value those caches imply.
IMPLIED_EXTRA: dict[str, Any] = {"fit": "shots"}
# Keys of cache_meta.json that record what a run found (run.record_prompt_fit), not settings it was asked for.
PROMPT_FIT = "prompt_fit"
RUN_RECORDS: tuple[str, ...] = (PROMPT_FIT,)
_PART_RE = re.compile(r"^cache\.part-([A-Za-z0-9_.-]+)\.csv$")
LOCK_FILE = ".cache.lock"
NO_PREDICTION = ""  # scoring.NO_LETTER: a generation that held no letter A-D


class CacheError(ValueError):
    """The cache directory holds rows from other settings, another format, or a broken file."""


class CacheWarning(UserWarning):
    """Something in a cache was repaired (identical duplicate rows collapsed)."""


@dataclass(frozen=True)
class CacheSettings:
    model: str
    checkpoint: str  # identity of the weights (hash, revision, path + mtime: the caller decides)
    template: str
    shots: int
    dtype: str
    split: str
    extra: Mapping[str, Any] = field(default_factory=dict)  # anything else that changes results
    provenance: Mapping[str, Any] = field(default_factory=dict)  # how the first rows were made; never compared

    def to_meta(self) -> dict[str, Any]:
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "template": self.template,
            "shots": self.shots,
            "dtype": self.dtype,
            "split": self.split,
            "extra": dict(self.extra),
        }
        if self.provenance:
            meta["provenance"] = dict(self.provenance)
        return meta


def lock(cache_dir: str | os.PathLike) -> FileLock:
    """The lock every writer and reader of a cache directory holds (filelock on ``.cache.lock`` in it).

    One instance per path and process (``is_singleton``), reentrant, so a caller holding it may call
    anything here.
    """
    return FileLock(Path(cache_dir) / LOCK_FILE, is_singleton=True)


def part_files(cache_dir: str | os.PathLike) -> list[Path]:
    """Worker part files left by an older npuinfer (nothing writes them now): read and merged."""
    d = Path(cache_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _PART_RE.match(p.name))


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
        if key in ("extra", "provenance") or key in RUN_RECORDS:
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
        if create_atomic(path, json.dumps(new, ensure_ascii=False, indent=2) + "\n"):
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
    with lock(d):  # another run may record its subjects at the same time
        meta = read_meta(d)
        merged = {**(meta.get(key) or {}), **entries}
        meta[key] = {k: merged[k] for k in sorted(merged, key=order)}
        write_atomic(d / META_FILE, json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def _rules_of(directory: str | os.PathLike) -> RowRules:
    """The row rules of a cache directory's task (cache_meta.json's extra.task; C-Eval when it has none)."""
    try:
        return rules_for(task_of(read_meta(directory)))
    except CacheError:  # no cache_meta.json (yet), or a broken one: reported where the settings are read
        return rules_for(CEVAL_TASK)


def _row_from_fields(fields: list[str], where: str, rules: RowRules | None = None, width: int | None = None
                     ) -> ScoredRow:
    """``width``: the columns of the file the row is in (a multiple-choice cache has a logprobs column or not)."""
    rules = rules or rules_for()
    width = width or len(rules.fields)
    if len(fields) != width:
        raise CacheError(f"{where}: {len(fields)} fields, expected {width}")
    subject, qid, answer, prediction, correct = fields[:len(LEGACY_FIELDS)]
    if not subject or not qid:
        raise CacheError(f"{where}: empty subject or question_id")
    if subject not in rules.subjects:
        known = "C-Eval subject" if rules.task == CEVAL_TASK else f"{rules.task} subject"
        raise CacheError(f"{where}: unknown {known} {subject!r} (not in subjects.csv)")
    if rules.answers is not None:
        if answer not in ("", *CHOICES):
            raise CacheError(f"{where}: answer {answer!r} is not empty or one of A, B, C, D")
        if prediction not in (NO_PREDICTION, *CHOICES):
            raise CacheError(f"{where}: prediction {prediction!r} is not one of A, B, C, D (or empty: no letter "
                             "generated)")
    expected = "" if answer == "" else ("1" if rules.correct(answer, prediction) else "0")
    if correct != expected:
        raise CacheError(
            f"{where}: correct is {correct!r} but answer {answer!r} and prediction "
            f"{prediction!r} give {expected!r}"
        )
    try:
        wide = not rules.generation and width > len(LEGACY_FIELDS)
        logprobs = parse_logprobs(fields[len(LEGACY_FIELDS)], len(CHOICES)) if wide else None
    except ValueError as e:
        raise CacheError(f"{where}: {e}") from None
    return ScoredRow(
        subject, qid, answer or None, prediction, None if correct == "" else correct == "1", logprobs,
        _generated_from_field(fields[len(LEGACY_FIELDS)], where) if rules.generation else None,
    )


def _generated_from_field(field: str, where: str) -> str:
    """A generation task's text column: a JSON string, so any text (a lone carriage return, NUL, quotes) stays one
    line of cache.csv and reads back exactly."""
    try:
        text = json.loads(field)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{where}: generated is not a JSON string ({exc.msg})") from None
    if not isinstance(text, str):
        raise CacheError(f"{where}: generated is not a JSON string")
    return text


def _row_to_fields(row: ScoredRow, rules: RowRules | None = None, wide: bool = True) -> list[str]:
    correct = "" if row.correct is None else ("1" if row.correct else "0")
    fields = [row.subject, row.question_id, row.answer or "", row.prediction, correct]
    if (rules or rules_for()).generation:
        return fields + [json.dumps(row.generated or "", ensure_ascii=False)]
    return [*fields, format_logprobs(row.logprobs)] if wide else fields


def _is_wide(rows: Iterable[ScoredRow]) -> bool:
    """Whether a multiple-choice cache.csv holding ``rows`` has the logprobs column: when some row has
    log-likelihoods (a cache scored by generation, or written before the column, keeps the five columns it had)."""
    return any(r.logprobs is not None for r in rows)


def _parse_records(text: str, path: Path, first_row_no: int, rules: RowRules | None = None,
                   width: int | None = None) -> tuple[list[tuple[int, ScoredRow]], bool]:
    """(row number, row) of CSV lines without a header, and whether the text was cut mid-row.

    Text that does not end in a newline was cut mid-write by a crash: its last row is kept when it
    is complete and valid, dropped otherwise.
    """
    records = list(csv.reader(io.StringIO(text, newline="")))
    cut = bool(text) and not text.endswith("\n")
    rows = []
    for row_no, fields in enumerate(records, start=first_row_no):
        where = f"{path}: row {row_no}"
        if cut and row_no == first_row_no + len(records) - 1:
            try:
                rows.append((row_no, _row_from_fields(fields, where, rules, width)))
            except CacheError:
                pass
        else:
            rows.append((row_no, _row_from_fields(fields, where, rules, width)))
    return rows, cut


def _parse(path: Path, rules: RowRules | None = None) -> tuple[list[tuple[int, ScoredRow]], bool]:
    """(row number, row) of one cache file, and whether it needs repair (empty, or cut mid-row)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CacheError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        return [], True
    header, newline, body = text.partition("\n")
    rules = rules or rules_for()
    columns = tuple(next(csv.reader([header]), []))
    if columns not in rules.headers:
        raise CacheError(f"{path}: row 0 (header): expected {' or '.join(','.join(h) for h in rules.headers)}, "
                         f"found {header}")
    if not newline:  # a header cut before its newline
        return [], True
    return _parse_records(body, path, 1, rules, len(columns))


def _width(path: Path) -> int:
    """Columns of a cache file, from its header."""
    with open(path, encoding="utf-8", newline="") as fh:
        return len(next(csv.reader([fh.readline()]), []))


def _serialize(rows: Iterable[ScoredRow], rules: RowRules | None = None) -> str:
    rows = list(rows)
    rules = rules or rules_for()
    wide = not rules.generation and _is_wide(rows)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rules.headers[0] if wide or rules.generation else rules.fields)
    writer.writerows(_row_to_fields(r, rules, wide) for r in rows)
    return buf.getvalue()


def _collect(directory: Path) -> tuple[dict[tuple[str, str], ScoredRow], bool]:
    """Every row of a cache directory (cache.csv, then leftover part files), validated as a whole, and
    whether cache.csv must be rewritten (parts to fold in, duplicates to collapse, a cut row).

    Conflicting rows for one question are an error naming every file and row involved; identical
    duplicates collapse to one, with a warning.
    """
    rules = _rules_of(directory)
    rows: dict[tuple[str, str], ScoredRow] = {}
    first_at: dict[tuple[str, str], str] = {}
    conflicts: dict[tuple[str, str], list[str]] = {}
    duplicates: list[str] = []
    parts = part_files(directory)
    rewrite = bool(parts)
    for path in [directory / CACHE_FILE, *parts]:
        if not path.exists():
            continue
        numbered, cut = _parse(path, rules)
        rewrite |= cut
        for row_no, row in numbered:
            at = f"{path} row {row_no}"
            first = rows.get(row.key)
            if first is None:
                rows[row.key], first_at[row.key] = row, at
            elif first == row:
                duplicates.append(at)
            else:
                conflicts.setdefault(row.key, [f"{first_at[row.key]} (prediction {first.prediction!r})"]).append(
                    f"{at} (prediction {row.prediction!r})")
    if conflicts:
        lines = [f"{s} id {q}: {'; '.join(where)}" for (s, q), where in conflicts.items()]
        raise CacheError(f"{directory}: {len(conflicts)} question(s) with conflicting rows; nothing is written "
                         f"until one row per question is left by hand:\n  " + "\n  ".join(lines))
    if duplicates:
        rewrite = True
        warnings.warn(CacheWarning(f"{directory}: {len(duplicates)} identical duplicate row(s) collapse into "
                                   f"one ({', '.join(duplicates[:5])}{', ...' if len(duplicates) > 5 else ''})"))
    return rows, rewrite


class QuestionCache:
    """Appends scored rows to cache.csv; any number of processes may do so at once.

    Every append holds the directory's lock and first catches up with what other processes appended
    (or a report rewrote) since, so a question scored elsewhere meanwhile is not written twice and an
    append never goes to a file that was replaced.
    """

    def __init__(self, cache_dir: str | os.PathLike, settings: CacheSettings) -> None:
        self.dir = Path(cache_dir)
        self.settings = settings
        self.path = self.dir / CACHE_FILE
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock(self.dir)
        self._file: io.TextIOWrapper | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the cache.csv self._file appends to
        self._offset = 0  # bytes of it already read
        self._rows_read = 0
        self._width = len(LEGACY_FIELDS)  # columns of the cache.csv self._file appends to
        self._rows: dict[tuple[str, str], ScoredRow] = {}  # every row in the directory, as of the last catch-up
        with self._lock:
            open_meta(self.dir, settings)
            self.rules = _rules_of(self.dir)
            self._catch_up()

    def _reopen(self) -> None:
        """Read the whole directory again (first open, or cache.csv was replaced) and append to cache.csv."""
        if self._file is not None:
            self._file.close()
            self._file = None
        rows, rewrite = _collect(self.dir)
        if rewrite or not self.path.exists():  # new, cut mid-row by a crash, duplicates, old part files
            _rewrite(self.dir, rows)
        self._rows = rows
        self._width = _width(self.path)
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        st = os.fstat(self._file.fileno())
        self._identity, self._offset = (st.st_dev, st.st_ino), st.st_size
        self._rows_read = self.path.read_text(encoding="utf-8").count("\n") - 1

    def _catch_up(self) -> None:
        """Under the lock: make self._rows hold every question in the directory, self._file append to the
        current cache.csv."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._reopen()
        if self._file is None or (st.st_dev, st.st_ino) != self._identity or st.st_size < self._offset:
            return self._reopen()
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        try:
            tail = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._reopen()  # which names the file and the bad bytes
        numbered, cut = _parse_records(tail, self.path, self._rows_read + 1, self.rules, self._width)
        if cut:  # another process died mid-row: repair the file, then read it again
            return self._reopen()
        self._rows.update((row.key, row) for _, row in numbered)
        self._offset, self._rows_read = st.st_size, self._rows_read + len(numbered)

    def scored_rows(self, subject: str | None = None) -> dict[tuple[str, str], ScoredRow]:
        """Rows already scored (of one subject, or all), by any process, validated."""
        return {k: r for k, r in self.snapshot(self.dir).items() if subject is None or r.subject == subject}

    @staticmethod
    def snapshot(directory: str | os.PathLike) -> dict[tuple[str, str], ScoredRow]:
        """Rows already scored in a cache directory, read without opening it for writing."""
        directory = Path(directory)
        if not directory.is_dir():
            return {}
        with lock(directory):
            return _collect(directory)[0]

    def scored_ids(self) -> set[tuple[str, str]]:
        """(subject, question_id) already scored, by any process."""
        return set(self.scored_rows())

    def add(self, row: ScoredRow) -> bool:
        """Append a row now (flushed and fsynced); False when the same row is already there (scored by
        another process running at the same time), which leaves the cache as it is."""
        with self._lock:
            self._catch_up()
            old = self._rows.get(row.key)
            if old == row:
                return False
            if old is not None:
                raise CacheError(f"{self.path}: {row.subject} id {row.question_id} is already scored with "
                                 f"prediction {old.prediction!r}, now {row.prediction!r}")
            assert self._file is not None
            if row.logprobs is not None and not self.rules.generation and self._width == len(LEGACY_FIELDS):
                # The first row with log-likelihoods: cache.csv gains the column, rewritten whole (once).
                _rewrite(self.dir, {**self._rows, row.key: row})
                self._reopen()
                return True
            self._file.write(_serialize_row(row, self.rules, self._width > len(LEGACY_FIELDS)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._rows[row.key] = row
            self._offset = os.fstat(self._file.fileno()).st_size
            self._rows_read += 1
            return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> QuestionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serialize_row(row: ScoredRow, rules: RowRules | None = None, wide: bool = True) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerow(_row_to_fields(row, rules, wide))
    return buf.getvalue()


def _id_key(qid: str) -> tuple[int, int, str]:
    return (0, int(qid), qid) if qid.isdigit() else (1, 0, qid)


def sort_key(row: ScoredRow, rules: RowRules | None = None) -> tuple[Any, ...]:
    """The task's subject order (C-Eval: subjects.csv), then numeric ids numerically."""
    return ((rules or rules_for()).order(row.subject), _id_key(row.question_id))


def read_all(cache_dir: str | os.PathLike) -> list[ScoredRow]:
    """Every row of a cache directory (cache.csv and leftover part files), validated, sorted by sort_key;
    nothing is written."""
    d = Path(cache_dir)
    _check_format(read_meta(d), d / META_FILE)
    if not (d / CACHE_FILE).exists() and not part_files(d):
        raise CacheError(f"{d / CACHE_FILE}: not found")
    with lock(d):
        rules = _rules_of(d)
        return sorted(_collect(d)[0].values(), key=lambda r: sort_key(r, rules))


def merge_parts(cache_dir: str | os.PathLike) -> Path:
    """Rewrite cache.csv sorted by sort_key, with leftover part files folded in (then deleted) and identical
    duplicates collapsed; returns cache.csv.

    The whole directory is validated first: on any bad or conflicting row nothing is written. No row is
    ever dropped (only an identical copy of one), and appenders in other processes are safe: they hold
    the same lock and notice the new file.
    """
    d = Path(cache_dir)
    _check_format(read_meta(d), d / META_FILE)
    with lock(d):
        return _rewrite(d, _collect(d)[0])


def _rewrite(directory: Path, rows: Mapping[tuple[str, str], ScoredRow]) -> Path:
    """Under the lock, with ``rows`` read and validated from the whole directory: cache.csv holds them all,
    sorted (replaced only when that changes it), and no part file is left."""
    parts = part_files(directory)
    target = directory / CACHE_FILE
    rules = _rules_of(directory)
    text = _serialize(sorted(rows.values(), key=lambda r: sort_key(r, rules)), rules)
    if not target.exists() or target.read_bytes() != text.encode("utf-8"):
        write_atomic(target, text)
    for part in parts:
        part.unlink()
    return target


def read_cache(cache_dir: str | os.PathLike) -> list[ScoredRow]:
    """Rows of cache.csv in file order, validated (merge_parts first when older part files are left)."""
    d = Path(cache_dir)
    _check_format(read_meta(d), d / META_FILE)
    path = d / CACHE_FILE
    if not path.exists():
        raise CacheError(f"{path}: not found")
    with lock(d):
        if part_files(d):
            raise CacheError(f"{d}: part files not merged into {CACHE_FILE} yet (npuinfer report ceval {d})")
        rows = _collect(d)[0]
    return list(rows.values())


# ---- rows against the data they were scored on ------------------------------------------------------------------

MAX_NAMED_ROWS = 20


def check_against_data(cache_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str,
                       subjects: Iterable[str] | None = None) -> None:
    """Every row of the cache (of ``subjects``, default all) names a question of the data's ``split`` file with
    that question's answer; else one CacheError naming each file and row that does not (a row for a question
    the data lacks would count in subject_acc.json but not in the run's own count; an answer that differs
    from the data's would be trusted). Reads only."""
    d = Path(cache_dir)
    wanted = set(subjects) if subjects is not None else None
    problems: list[str] = []
    data: dict[str, dict[str, str | None]] = {}
    with lock(d):
        rules = _rules_of(d)
        rows_of = TaskData(rules.spec, data_dir)
        for path in [d / CACHE_FILE, *part_files(d)]:
            if not path.exists():
                continue
            for row_no, row in _parse(path, rules)[0]:
                if wanted is not None and row.subject not in wanted:
                    continue
                if row.subject not in data:
                    data[row.subject] = rows_of.answers(row.subject, split)
                source = rows_of.path(row.subject, split)
                if row.question_id not in data[row.subject]:
                    problems.append(f"{path} row {row_no}: {row.subject} id {row.question_id} is no question of "
                                    f"{source}")
                elif data[row.subject][row.question_id] != row.answer:
                    problems.append(f"{path} row {row_no}: {row.subject} id {row.question_id} has answer "
                                    f"{row.answer!r}; {source} says {data[row.subject][row.question_id]!r}")
    if problems:
        shown = problems[:MAX_NAMED_ROWS] + ([f"... and {len(problems) - MAX_NAMED_ROWS} more"]
                                             if len(problems) > MAX_NAMED_ROWS else [])
        raise CacheError(f"{d}: {len(problems)} cache row(s) do not match the data they claim to be scored on; "
                         "nothing was rewritten: remove those rows, or score into a new directory:\n  "
                         + "\n  ".join(shown))


def check_meta_data(cache_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """`check_against_data` with the data directory and split cache_meta.json records; a warning when that
    directory is gone (the rows cannot be checked), nothing when the cache records none."""
    data_dir = (meta.get("extra") or {}).get("data_dir")
    if not data_dir:
        return
    if not Path(data_dir).is_dir():
        warnings.warn(CacheWarning(f"{Path(cache_dir) / META_FILE}: the data directory {data_dir} is gone: rows "
                                   "not checked against the questions they were scored on"))
        return
    check_against_data(cache_dir, data_dir, str(meta.get("split")))
