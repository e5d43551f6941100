"""The serving benchmark's arithmetic and prompts, without a server: vllm bench serve's metric definitions on
constructed request records (figures computed by hand), the arrival process, exact-length salted prompts under
every tokenizer kind, ShareGPT reading, the server's /metrics deltas and the stream's chunk counting."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from npuinfer.families import family_of_config
from npuinfer.hf_config import read_config
from npuinfer.serving.load import LoadPlan
from npuinfer.serving.metrics import Limits, bunched_share, length_problems, serving_figures
from npuinfer.serving.server_metrics import Scrape, server_figures
from npuinfer.serving.stream import RequestRecord, _chunk
from npuinfer.serving.workload import (
    Workload, WorkloadError, make_prompts, parse_workload, prefix_hit_rate,
)
from npuinfer.tokenizer import load_tokenizer


def record(index, sent, chunks, counts=None, prompt=8, out=None, error=None):
    r = RequestRecord(index, prompt, out or len(chunks))
    r.sent, r.chunk_times, r.chunk_tokens = sent, list(chunks), list(counts or [1] * len(chunks))
    r.end = chunks[-1] if chunks else sent
    r.prompt_tokens, r.completion_tokens, r.error = prompt, sum(r.chunk_tokens), error
    return r


def test_figures_follow_vllm_bench_serve_definitions_by_hand():
    a = record(0, 0.0, [0.100, 0.110, 0.130, 0.160])  # ttft 100 ms, 4 tokens, latency 160 ms
    b = record(1, 0.050, [0.250, 0.260])  # ttft 200 ms, 2 tokens, latency 210 ms
    c = record(2, 0.0, [0.300])  # one token: no TPOT, no ITL
    d = record(3, 0.0, [], error="HTTP 500: boom")
    f = serving_figures([a, b, c, d], duration_s=0.5, limits=Limits(ttft_ms=150, tpot_ms=25))
    assert (f["completed"], f["failed"]) == (3, 1)
    assert f["ttft_mean_ms"] == pytest.approx((100 + 200 + 300) / 3)
    assert f["ttft_median_ms"] == pytest.approx(200)
    # TPOT = (latency - TTFT) / (tokens - 1): a (160 - 100) / 3 = 20 ms, b (210 - 200) / 1 = 10 ms; c left out
    assert f["tpot_mean_ms"] == pytest.approx(15) and f["tpot_median_ms"] == pytest.approx(15)
    # ITL: a 10, 20, 30 ms; b 10 ms
    assert f["itl_mean_ms"] == pytest.approx(17.5) and f["itl_median_ms"] == pytest.approx(15)
    assert f["itl_p90_ms"] == pytest.approx(27.0)  # sorted 10, 10, 20, 30: at 0.9 x 3 = 2.7, 20 + 0.7 x 10
    assert f["e2el_mean_ms"] == pytest.approx((160 + 210 + 300) / 3)
    assert f["output_tokens"] == 7 and f["output_throughput"] == pytest.approx(14)
    assert f["request_throughput"] == pytest.approx(6)
    # goodput: a (ttft 100 <= 150, tpot 20 <= 25) only; b's TTFT 200 and c's 300 are beyond
    assert f["goodput"] == pytest.approx(1 / 0.5)
    assert serving_figures([a], 1.0)["goodput"] is None  # no limits given: no goodput


def test_a_chunk_carrying_two_tokens_counts_two_and_usage_overrides_the_count():
    r = RequestRecord(0, 4, 3)
    _chunk({"choices": [{"index": 0, "text": "ab", "token_ids": [5, 6], "finish_reason": None}]}, 1.0,
           r.chunk_times, r.chunk_tokens, r)
    _chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}, 1.5, r.chunk_times, r.chunk_tokens, r)
    assert r.chunk_tokens == [2, 1] and r.output_tokens == 3 and r.finish_reason == "length"
    _chunk({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, 1.6, r.chunk_times,
           r.chunk_tokens, r)
    assert len(r.chunk_times) == 2 and (r.prompt_tokens, r.completion_tokens) == (4, 3)
    _chunk({"error": {"message": "engine died"}}, 1.7, r.chunk_times, r.chunk_tokens, r)
    assert not r.ok and "engine died" in r.error


def test_lengths_off_by_more_than_a_few_tokens_are_named():
    good = record(0, 0.0, [0.1, 0.2], prompt=64, out=2)
    shifted = record(1, 0.0, [0.1, 0.2], prompt=64, out=2)
    shifted.prompt_tokens = 71
    short = record(2, 0.0, [0.1], prompt=64, out=1)
    short.output_len = 32
    problems = length_problems([good, shifted, short], ignore_eos=True)
    assert len(problems) == 2 and "71 prompt tokens" in problems[0] and "1 output tokens, 32 asked" in problems[1]
    assert len(length_problems([good, shifted, short], ignore_eos=False)) == 1


def test_arrivals_are_gamma_gaps_with_the_rate_and_burstiness_asked():
    assert LoadPlan().send_offsets(5) == [0.0] * 5  # inf: all at once
    for burstiness in (1.0, 0.25):
        offsets = LoadPlan(rate=4.0, burstiness=burstiness, seed=3).send_offsets(4001)
        gaps = [b - a for a, b in zip(offsets, offsets[1:])]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(0.25, rel=0.08)
        cv2 = statistics.pvariance(gaps) / mean ** 2  # gamma: squared coefficient of variation = 1 / shape
        assert cv2 == pytest.approx(1 / burstiness, rel=0.2)
    assert LoadPlan(rate=4.0, seed=3).send_offsets(50) == LoadPlan(rate=4.0, seed=3).send_offsets(50)


@pytest.mark.parametrize("name", ["qwen-tiny", "internlm-tiny", "llama3-tiny", "gpt-neox-tiny"])
def test_prompts_have_exactly_the_asked_tokens_and_a_fresh_salt_changes_them(tiny_dir, name):
    d = tiny_dir(name)
    tok = load_tokenizer(d, family_of_config(read_config(d), str(d / "config.json")))
    prompts = make_prompts(Workload("random"), tok, 6, 48, 8, seed=0, salt="aa")
    assert [len(tok.encode(p.text, add_bos=False)) for p in prompts] == [48] * 6
    assert [p.text for p in make_prompts(Workload("random"), tok, 6, 48, 8, seed=0, salt="aa")] == \
        [p.text for p in prompts]  # the same salt replays
    again = make_prompts(Workload("random"), tok, 6, 48, 8, seed=0, salt="bb")
    assert not {p.text for p in again} & {p.text for p in prompts}
    shared = make_prompts(Workload("prefix", prefix_len=32), tok, 4, 48, 8, seed=0, salt="aa")
    assert [len(tok.encode(p.text, add_bos=False)) for p in shared] == [48] * 4
    heads = {tuple(tok.encode(p.text, add_bos=False)[:30]) for p in shared}
    assert len(heads) == 1 and len({p.text for p in shared}) == 4


def test_prefix_hit_rate_and_workload_option():
    assert prefix_hit_rate(Workload("prefix", prefix_len=32), 10, 64) == pytest.approx(32 * 9 / 640)
    assert prefix_hit_rate(Workload("random"), 10, 64) is None
    assert parse_workload("prefix 16") == Workload("prefix", prefix_len=16)
    for bad in ("prefix", "prefix -3", "zipf", "sharegpt /no/such.json"):
        with pytest.raises(WorkloadError, match="--workload"):
            parse_workload(bad)


def test_sharegpt_reads_first_turns_and_names_what_is_wrong(tiny_dir, tmp_path):
    d = tiny_dir("gpt-neox-tiny")
    tok = load_tokenizer(d, family_of_config(read_config(d), str(d / "config.json")))
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": f"question number {i} " * 4},
                                              {"from": "gpt", "value": f"the answer is {i} " * 5}]}
             for i in range(6)] + [{"id": "short", "conversations": [{"from": "human", "value": "hi"},
                                                                     {"from": "gpt", "value": "yo"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs), encoding="utf-8")
    prompts = make_prompts(parse_workload(f"sharegpt {path}"), tok, 6, 0, 0, seed=0, salt="cafe")
    assert len(prompts) == 6 and all(p.text.startswith("[cafe] question number") for p in prompts)
    assert all(p.prompt_len == len(tok.encode(p.text, add_bos=False)) for p in prompts)
    with pytest.raises(WorkloadError, match="7 usable|6 usable"):
        make_prompts(parse_workload(f"sharegpt {path}"), tok, 7, 0, 0, seed=0, salt="cafe")
    path.write_text('{"not": "a list"}', encoding="utf-8")
    with pytest.raises(WorkloadError, match="expected a JSON list"):
        make_prompts(parse_workload(f"sharegpt {path}"), tok, 1, 0, 0, seed=0, salt="cafe")


def test_server_figures_are_deltas_of_the_scrapes():
    before = Scrape({"vllm:time_to_first_token_seconds_sum": 1.0, "vllm:time_to_first_token_seconds_count": 10,
                     "vllm:prefix_cache_queries_total": 100, "vllm:prefix_cache_hits_total": 0})
    after = Scrape({"vllm:time_to_first_token_seconds_sum": 1.5, "vllm:time_to_first_token_seconds_count": 20,
                    "vllm:prefix_cache_queries_total": 300, "vllm:prefix_cache_hits_total": 50})
    out = server_figures(before, after)
    assert out["server_ttft_mean_ms"] == pytest.approx(50)
    assert out["server_prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert out["server_metrics"].startswith("absent: ") and "vllm:inter_token_latency_seconds" in out["server_metrics"]
    gone = server_figures(Scrape({}, "http://x/metrics answered 404"), after)
    assert gone["server_ttft_mean_ms"] is None and gone["server_metrics"] == "absent: http://x/metrics answered 404"
    assert not math.isnan(out["server_ttft_mean_ms"])
    other = server_figures(Scrape({"mindie_x_total": 1.0}), Scrape({"mindie_x_total": 2.0}))
    assert other["server_ttft_mean_ms"] is None and "without the names of vllm:, sglang: servers" in \
        other["server_metrics"]


def test_answers_read_whole_are_told_from_a_paced_stream():
    paced = [record(i, 0.0, [0.010 + 0.004 * k for k in range(8)]) for i in range(3)]
    whole = [record(i, 0.0, [0.040] * 8) for i in range(3)]
    assert bunched_share(paced) == 0.0 and bunched_share(whole) == 1.0
    assert serving_figures(whole, 1.0)["tpot_median_ms"] == 0.0  # what such a case would report as TPOT


def test_the_gate_reads_only_the_throughput_of_a_case_read_in_bursts():
    from npuinfer.gates.performance import compare_row

    base = {"case_id": "c2", "batch_size": "2", "output_seq_len(Decoding)": "16", "timing": "serving",
            "forward_first_token_time(ms)": "20", "forward_next_token_time(ms)": "3", "E2E throughput (token/s)": "300",
            "stream_bunched": "0.02"}
    paced_slow = {**base, "forward_first_token_time(ms)": "80", "E2E throughput (token/s)": "290"}
    assert compare_row(paced_slow, base, max_regression=1.0).status == "failed"  # TTFT 4x
    bursty = {**paced_slow, "forward_next_token_time(ms)": "0.01", "stream_bunched": "0.98"}
    outcome = compare_row(bursty, base, max_regression=1.0)
    assert outcome.status == "passed" and [c.metric for c in outcome.checks] == ["E2E throughput (token/s)"]
    assert any("no value to compare" in n for n in outcome.notes)
