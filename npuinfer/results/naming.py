"""Result file names, made and read in one place: ``<kind>_<model>_<device>[.csv]``.

Kinds: ``performance``, ``calibration``, ``max_batch`` (CSV files), ``ceval`` and the other accuracy tasks
directories (``cmmlu``, ``mmlu``, ``gsm8k``, ``gsm8k_cot``: npuinfer/tasks). The device
label never holds an underscore (``cpu``, ``npu0``, ``cuda1``), so the model is everything before the last one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PERFORMANCE, CALIBRATION, MAX_BATCH, CEVAL = "performance", "calibration", "max_batch", "ceval"
CSV_KINDS = (PERFORMANCE, CALIBRATION, MAX_BATCH)
TASK_KINDS = ("cmmlu", "mmlu", "gsm8k_cot", "gsm8k")  # accuracy tasks beside C-Eval, one directory a run
KINDS = (*CSV_KINDS, CEVAL, *TASK_KINDS)

# Longest kinds first: gsm8k_cot_<model> is of gsm8k_cot, not gsm8k's model cot_<model>.
_NAME_RE = re.compile(r"^(?P<kind>" + "|".join(sorted(KINDS, key=len, reverse=True))
                      + r")_(?P<rest>.+?)(?P<csv>\.csv)?$")
_MODEL_DEVICE_RE = re.compile(r"^(?P<model>.+)_(?P<device>[^_]+)$")


@dataclass(frozen=True)
class ResultName:
    kind: str
    model: str
    device: str  # "" when the name held no device label

    @property
    def name(self) -> str:
        stem = f"{self.kind}_{self.model}" + (f"_{self.device}" if self.device else "")
        return stem + (".csv" if self.kind in CSV_KINDS else "")

    def path(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / self.name

    def as_kind(self, kind: str) -> "ResultName":
        """The same model and device in another kind of file (a performance CSV's calibration)."""
        return ResultName(kind, self.model, self.device)

    @classmethod
    def parse(cls, name: str) -> "ResultName | None":
        """``performance_qwen-7b_npu0.csv`` -> (performance, qwen-7b, npu0); None for a name of no kind here.
        A name without a device label (``performance_x.csv``) reads as model ``x``, device ``""``."""
        match = _NAME_RE.match(name)
        if match is None or (match["kind"] in CSV_KINDS) != bool(match["csv"]):
            return None
        parts = _MODEL_DEVICE_RE.match(match["rest"])
        model, device = (parts["model"], parts["device"]) if parts else (match["rest"], "")
        return cls(match["kind"], model, device)


def result_path(kind: str, results_dir: str | Path, model: str, device_label: str) -> Path:
    return ResultName(kind, model, device_label).path(results_dir)


def model_of(path: str | Path) -> str:
    """The model a result file or directory is named after (its own name when it is not a result name)."""
    parsed = ResultName.parse(Path(path).name)
    return parsed.model if parsed is not None else Path(path).name


def calibration_of(performance_csv: Path) -> Path:
    """The calibration CSV beside a performance CSV."""
    parsed = ResultName.parse(performance_csv.name)
    if parsed is None or parsed.kind != PERFORMANCE:
        raise ValueError(f"{performance_csv}: not a performance_<model>_<device>.csv name")
    return performance_csv.with_name(parsed.as_kind(CALIBRATION).name)


def kind_of(path: str | Path) -> str | None:
    """A result file's kind (performance, calibration, max_batch, ceval), None for any other name."""
    parsed = ResultName.parse(Path(path).name)
    return parsed.kind if parsed is not None else None
