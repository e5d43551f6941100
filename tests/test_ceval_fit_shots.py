"""--fit shots is the behaviour before --fit existed: cache.csv byte for byte as the code before it wrote.

The fixtures in tests/data/ceval_fit_shots/ are cache.csv files written by that code (main at e747a74,
`MAX_SEQ_LEN=377 pytest accuracy/ --model qwen-tiny --model internlm-tiny`) on the shipped sample: at 377 tokens
every subject drops shots (1-3 of 5 kept), and no prompt of any tiny model is exactly 377 tokens long, the one
length at which lm-eval's budget (now used) keeps a shot the old budget dropped.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from npuinfer.ceval import available_subjects, merge_parts, sample_dir
from npuinfer.backends.npuinfer import NpuinferBackend
from npuinfer.ceval.run import CevalRun, RunSettings

FIXTURES = Path(__file__).parent / "data" / "ceval_fit_shots"


@pytest.mark.parametrize("name", ["qwen-tiny", "internlm-tiny"])
def test_fit_shots_writes_the_cache_of_before(name, npuinfer_cache, tmp_path):
    from npuinfer.runtime import load_model

    loaded = load_model(name, device="cpu", dtype="fp32", max_seq_len=377)
    run = CevalRun(NpuinferBackend(loaded), RunSettings(sample_dir(), fit="shots"), tmp_path)
    try:
        fits = [run.run_subject(s).fit for s in available_subjects(sample_dir(), "val")]
    finally:
        run.close()
    assert all(f.dropped_shots > 0 and f.truncated == 0 for f in fits)  # the fit did something everywhere
    from accuracy_runs import cache_columns

    # The fixture predates the logprobs column: every other column is compared.
    rows, logprobs = cache_columns(merge_parts(tmp_path))
    assert rows == cache_columns(FIXTURES / f"{name}_max_seq_len_377.csv")[0]
    assert all(len(lp) == 4 for lp in logprobs)
