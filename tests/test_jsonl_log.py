"""`*.rounds.jsonl`, the per-round log of a sweep, is appended to. A run killed mid-write leaves a torn last
line; the next append used to join its record to that line, losing both. npuinfer.results.table.append_jsonl."""
from __future__ import annotations

import json

import pytest

from npuinfer.results.table import TornLineWarning, append_jsonl


def test_a_torn_last_line_is_set_aside_and_the_next_record_lands_whole(tmp_path):
    log = tmp_path / "performance_qwen-tiny_cpu.rounds.jsonl"
    append_jsonl(log, {"case_id": "a", "rounds": [1.0]})
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('{"case_id":"b","rou')  # killed here
    with pytest.warns(TornLineWarning, match=r"rounds\.jsonl: ended in a torn line \(19 bytes.*moved to .*\.torn"):
        append_jsonl(log, {"case_id": "c", "rounds": [2.0]})
    assert [json.loads(line)["case_id"] for line in log.read_text(encoding="utf-8").splitlines()] == ["a", "c"]
    assert (tmp_path / f"{log.name}.torn").read_text(encoding="utf-8") == '{"case_id":"b","rou\n'
    append_jsonl(log, {"case_id": "d"})  # a whole file: nothing set aside again
    assert len(log.read_text(encoding="utf-8").splitlines()) == 3


def test_a_file_that_is_one_torn_line_keeps_it_aside(tmp_path):
    log = tmp_path / "x.rounds.jsonl"
    log.write_bytes(b'{"half')
    with pytest.warns(TornLineWarning):
        append_jsonl(log, {"case_id": "e"})
    assert log.read_text(encoding="utf-8") == '{"case_id":"e"}\n'
    assert (tmp_path / "x.rounds.jsonl.torn").read_bytes() == b'{"half\n'
