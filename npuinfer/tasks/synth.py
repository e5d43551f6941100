"""Synthetic data in the official layouts of the shipped tasks (random text; only the layout is real).

    python -m npuinfer.tasks.synth                 regenerate the samples shipped in npuinfer/tasks/sample/
    python -m npuinfer.tasks.synth mmlu OUT --test 100   a bigger copy (every subject) for comparisons
    python -m npuinfer.tasks.synth mmlu OUT --test official   the official test split's size, subject by subject

CMMLU: <dir>/{dev,test}/<subject>.csv, header ",Question,A,B,C,D,Answer" (an unnamed index column first).
MMLU: <dir>/{dev,val,test}/<subject>_<split>.csv, no header: question, A, B, C, D, answer.
GSM8K: <dir>/{train,test}.jsonl, {"question": ..., "answer": "...\\n#### N"} per line.
Each subject draws from its own generator seeded by (seed, task, subject), so a subset gets the same files.
The official test counts (MMLU 14,042 questions, CMMLU 11,582) are the ``test_count`` column of the subject
tables in npuinfer/tasks/subjects/; MMLU's val split, which no task scores, gets as many rows as its test split.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from npuinfer.tasks.spec import load_task

SUBJECTS_DIR = Path(__file__).resolve().parent / "subjects"

LETTERS = ("A", "B", "C", "D")
DEV_ROWS = 5
SAMPLE_TEST = 2
SAMPLE_GSM8K_TRAIN, SAMPLE_GSM8K_TEST = 10, 4
_HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
_WORDS = ("protocol", "kernel", "matrix", "entropy", "market", "theory", "history", "law", "cell", "energy",
          "policy", "value", "signal", "network", "ratio", "origin", "reform", "culture", "apples", "train")
_TRICKY = ("NA", "None", "0", "007", "1.50", "-3", "TRUE", "")  # what a careless CSV reader turns into numbers


def _text(rng: random.Random, lo: int, hi: int, zh: bool) -> str:
    if zh:
        words = ["".join(rng.choice(_HANZI) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(lo, hi))]
        return rng.choice(("，", "", "、")).join(words)
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _question(rng: random.Random, zh: bool) -> str:
    text = _text(rng, 3, 9, zh) + rng.choice(("？", "____。") if zh else ("?", " ____.", ":"))
    roll = rng.random()
    if roll < 0.15:
        text = text.replace("，" if zh else " ", "\n", 1)  # a quoted multi-line field
    elif roll < 0.3:
        text = " " + text + "\n"  # lm-eval strips the question, never the choices
    return text


def _choices(rng: random.Random, zh: bool) -> list[str]:
    return [rng.choice(_TRICKY) if rng.random() < 0.08 else _text(rng, 1, 3, zh) for _ in LETTERS]


def _write_csv(path: Path, header: Sequence[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)


def official_test_counts(task: str) -> dict[str, int]:
    """Each subject's question count in the task's published test split (the subject table's test_count)."""
    path = SUBJECTS_DIR / f"{task}.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {r["subject"]: int(r["test_count"]) for r in rows}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: every row needs a test_count (a whole number): {e!r}") from None


def _test_rows(task: str, test_rows: int | None, names: Sequence[str]) -> dict[str, int]:
    if test_rows is None:
        counts = official_test_counts(task)
        return {name: counts[name] for name in names}
    return dict.fromkeys(names, test_rows)


def write_cmmlu(out: str | os.PathLike, test_rows: int | None, seed: int = 0,
                subjects: Sequence[str] | None = None) -> Path:
    """test_rows per subject, or None: each subject's official test count."""
    out = Path(out)
    counts = _test_rows("cmmlu", test_rows, subjects or load_task("cmmlu").subject_names)
    for name, n_test in counts.items():
        rng = random.Random(f"{seed}:cmmlu:{name}")
        for split, n in (("dev", DEV_ROWS), ("test", n_test)):
            rows = [[str(i), _question(rng, True), *_choices(rng, True), rng.choice(LETTERS)] for i in range(n)]
            _write_csv(out / split / f"{name}.csv", ["", "Question", *LETTERS, "Answer"], rows)
    return out


def write_mmlu(out: str | os.PathLike, test_rows: int | None, seed: int = 0,
               subjects: Sequence[str] | None = None) -> Path:
    """test_rows (and val rows) per subject, or None: each subject's official test count."""
    out = Path(out)
    counts = _test_rows("mmlu", test_rows, subjects or load_task("mmlu").subject_names)
    for name, n_test in counts.items():
        rng = random.Random(f"{seed}:mmlu:{name}")
        for split, n in (("dev", DEV_ROWS), ("val", n_test), ("test", n_test)):
            rows = [[_question(rng, False), *_choices(rng, False), rng.choice(LETTERS)] for _ in range(n)]
            _write_csv(out / split / f"{name}_{split}.csv", None, rows)
    return out


def _problem(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(2, 90), rng.randint(2, 2000)
    result = rng.choice((a + b, a * b, a - b))
    who = rng.choice(("Janet", "Tom", "Weng", "Mrs. Lee"))
    question = f"{who} has {a} {rng.choice(_WORDS)} and gets {b} more. " + _text(rng, 3, 12, False).capitalize() + "?"
    steps = f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n" + _text(rng, 2, 8, False).capitalize() + "."
    shown = f"{result:,}" if rng.random() < 0.3 else str(result)
    return {"question": question, "answer": f"{steps}\n#### {shown}"}


def write_gsm8k(out: str | os.PathLike, train_rows: int, test_rows: int, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_rows), ("test", test_rows)):
        rng = random.Random(f"{seed}:gsm8k:{split}")
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for _ in range(n):
                f.write(json.dumps(_problem(rng), ensure_ascii=False) + "\n")
    return out


def write_samples() -> list[Path]:
    return [write_cmmlu(load_task("cmmlu").sample_dir(), SAMPLE_TEST),
            write_mmlu(load_task("mmlu").sample_dir(), SAMPLE_TEST),
            write_gsm8k(load_task("gsm8k").sample_dir(), SAMPLE_GSM8K_TRAIN, SAMPLE_GSM8K_TEST)]


def rows_arg(value: str) -> int | None:
    """--test: a row count, or 'official' (None: each subject's published test count)."""
    if value == "official":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a row count (0 or more) or 'official', got {value!r}")
    return n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic data in a task's official layout.")
    parser.add_argument("task", nargs="?", choices=("cmmlu", "mmlu", "gsm8k"))
    parser.add_argument("out", nargs="?")
    parser.add_argument("--test", type=rows_arg, default=100,
                        help="test (and MMLU val) rows per subject, or 'official': each subject's published count")
    parser.add_argument("--train", type=int, default=200, help="GSM8K train rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.task is None:
        for path in write_samples():
            print(path)
        return
    if args.out is None:
        parser.error("an output directory is needed with a task")
    if args.task == "gsm8k":
        if args.test is None:
            parser.error("--test official is for cmmlu and mmlu; gsm8k needs a row count")
        print(write_gsm8k(args.out, args.train, args.test, args.seed))
    else:
        print((write_cmmlu if args.task == "cmmlu" else write_mmlu)(args.out, args.test, args.seed))


if __name__ == "__main__":
    main()
