"""Result files: generic keyed CSV / markdown helpers (table.py) and the performance tables (performance.py)."""
from .table import CsvTable, append_jsonl, markdown_table, read_csv

__all__ = ["CsvTable", "append_jsonl", "markdown_table", "read_csv"]
