"""Tasks as data: the task file format (spec), the shipped task files (``<name>.yaml``), their subject tables
and samples, the readers of their data layouts (data), and lm-eval's answer filters and exact match (extract).

Nothing here imports torch or a model: the scoring machinery is npuinfer.ceval (multiple choice by
log-likelihood, generation), which reads a TaskSpec.
"""
from npuinfer.tasks.spec import (
    FilterSpec,
    Prompt,
    TaskFileError,
    TaskSpec,
    TaskSubject,
    load_task,
    task_names,
)

__all__ = ["FilterSpec", "Prompt", "TaskFileError", "TaskSpec", "TaskSubject", "load_task", "task_names"]
