"""npuinfer.roofline: bytes and FLOPs per step against values computed by hand from the published shapes, the
probes, and the roofline columns of a real bench run."""
from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.results.performance import SERVING_COLUMNS
import torch

from npuinfer.device import get_device
from npuinfer.dummy import registry_args
from npuinfer.registry import MODELS
from npuinfer.roofline import (FLOPS_PROBE_REPEATS, FLOPS_PROBE_SECONDS, Peak, TimedOp, best_rates,
                               flops_probe_ops, flops_probe_size, kv_bytes_per_step, mean_decode_window, prefill_flops,
                               probe_bandwidth, probe_flops, rate_readings, roofline_figures, spec_peaks,
                               weight_bytes_per_step)

REPO = Path(__file__).resolve().parents[1]
QWEN_7B = registry_args(MODELS["qwen-7b"])
BAICHUAN2_13B = registry_args(MODELS["baichuan2-13b"])

# Hand computation, qwen-7b (REFERENCE.md section 1): hidden 4096, 32 layers, 32 heads x 128, MLP 11008 per branch,
# vocab 151936, fused c_attn with bias, c_proj and MLP without, RMSNorm (one 4096 scale).
Q_LAYER_MATS = 4096 * 3 * 4096 + 4096 * 4096 + 3 * 4096 * 11008  # c_attn, c_proj, w1 w2 c_proj
Q_LAYER = Q_LAYER_MATS + 3 * 4096 + 2 * 4096  # + c_attn bias + ln_1, ln_2
Q_EMBED = 151936 * 4096
# baichuan2-13b: hidden 5120, 40 layers, 40 heads x 128, MLP 13696, vocab 125696, no biases, ALiBi (no weights).
B_LAYER_MATS = 5120 * 3 * 5120 + 5120 * 5120 + 3 * 5120 * 13696
B_LAYER = B_LAYER_MATS + 2 * 5120


def test_parameter_totals_are_the_published_ones():
    assert 32 * Q_LAYER + 2 * Q_EMBED + 4096 == QWEN_7B.num_parameters() == 7_721_324_544
    assert 40 * B_LAYER + 2 * 125696 * 5120 + 5120 == BAICHUAN2_13B.num_parameters() == 13_896_668_160


def test_qwen_7b_decode_bytes_and_prefill_flops():
    # a decode step reads every layer, the final norm and the head once, and batch rows of the embedding
    assert weight_bytes_per_step(QWEN_7B, 1, 2) == (32 * Q_LAYER + 4096 + Q_EMBED + 1 * 4096) * 2 == 14_197_997_568
    assert weight_bytes_per_step(QWEN_7B, 4, 2) == (32 * Q_LAYER + 4096 + Q_EMBED + 4 * 4096) * 2
    # K and V, 32 layers, batch 4, 1536 slots (input 1024 + output 1024 / 2), 32 heads x 128, bf16
    assert mean_decode_window(1024, 1024) == 1536
    assert kv_bytes_per_step(QWEN_7B, 4, 1536, 2) == 2 * 32 * 4 * 1536 * 32 * 128 * 2 == 3_221_225_472
    # prefill of 1024 tokens at batch 2: the layers' matrices for every token, the head for the last one only,
    # causal attention q.k^T and p.v over half the 1024 x 1024 square in each of 32 layers
    expected = 2 * 32 * Q_LAYER_MATS * 2 * 1024 + 2 * 4096 * 151936 * 2 + 32 * 2 * 2 * 2 * 4096 * 1024 * 1024 / 2
    assert prefill_flops(QWEN_7B, 2, 1024) == expected == pytest.approx(2.7078e13, rel=1e-4)


def test_baichuan2_13b_alibi_bytes_and_flops():
    assert BAICHUAN2_13B.position == "alibi"
    assert weight_bytes_per_step(BAICHUAN2_13B, 1, 2) == (40 * B_LAYER + 5120 + 125696 * 5120 + 5120) * 2
    assert weight_bytes_per_step(BAICHUAN2_13B, 1, 2) == 26_506_219_520
    assert kv_bytes_per_step(BAICHUAN2_13B, 1, 300, 2) == 2 * 40 * 300 * 5120 * 2 == 245_760_000
    assert prefill_flops(BAICHUAN2_13B, 1, 256) == 2 * 40 * B_LAYER_MATS * 256 + 2 * 5120 * 125696 \
        + 40 * 2 * 2 * 5120 * 256 * 256 / 2


def test_tensor_parallel_2_halves_heads_and_mlp_but_not_embedding_head_or_norms():
    rank = QWEN_7B.with_(tp_size=2, tp_rank=1)
    mats = 4096 * 3 * 2048 + 2048 * 4096 + 3 * 4096 * 5504  # 16 heads x 128 per rank, 5504 per MLP branch
    layer = mats + 3 * 2048 + 2 * 4096  # this rank's share of the c_attn bias; both norms whole
    assert weight_bytes_per_step(rank, 1, 2) == (32 * layer + 4096 + Q_EMBED + 4096) * 2 == 7_721_598_976
    assert kv_bytes_per_step(rank, 4, 1536, 2) == kv_bytes_per_step(QWEN_7B, 4, 1536, 2) / 2
    assert prefill_flops(rank, 1, 512) == 2 * 32 * mats * 512 + 2 * 4096 * 151936 + 32 * 2 * 2 * 2048 * 512 * 512 / 2


def test_row_figures_from_times_and_peaks():
    bw, fl = Peak(20e9, "probe: test"), Peak(1e12, "probe: test")
    fig = roofline_figures(QWEN_7B, 1, 256, 256, torch.bfloat16, first_token_ms=2000.0, next_token_ms=800.0,
                           bandwidth=bw, flops=fl)
    moved = 14_197_997_568 + kv_bytes_per_step(QWEN_7B, 1, 384, 2)
    assert fig["achieved_bandwidth(GB/s)"] == pytest.approx(moved / 0.8 / 1e9)
    assert fig["MBU"] == pytest.approx(moved / 0.8 / 20e9)
    assert fig["MFU"] == pytest.approx(prefill_flops(QWEN_7B, 1, 256) / 2.0 / 1e12)
    assert fig["peak_bandwidth_source"] == "probe: test" and fig["spec_bandwidth(GB/s)"] is None
    assert spec_peaks("NVIDIA H200", torch.bfloat16)[0].source.startswith("spec: ")


def test_probes_measure_this_device():
    cpu = get_device("cpu")
    bw = probe_bandwidth(cpu, torch.float32, size=64 * 2**20, repeats=2)
    assert 1e8 < bw.value < 1e13 and bw.source.startswith("probe: ") and "0.0625 GiB" in bw.source
    fl = probe_flops(cpu, torch.float32, n=256, repeats=2)
    assert 1e8 < fl.value < 1e15 and "256^3" in fl.source
    assert f"{torch.get_num_threads()} threads" in fl.source and f"{torch.get_num_threads()} threads" in bw.source


@torch.inference_mode()
def test_flops_probe_is_not_beaten_by_a_real_size_prefill_timed_the_same_way():
    """MFU <= 1 needs a probe that no honest prefill beats. A prefill through one qwen-7b layer (real widths, dummy
    bf16, linears prepared as a run prepares them) at batch 4 x 32 tokens, the case whose MFU read 1.04 against
    the old 1024^3 probe, is read in turn with the probe's own products, with the probe's repeats and duration and
    the threads torch uses, so the machine's state is the same for both. A row's first-token time is the median of
    its rounds: the probe's best must be at least the prefill's median rate (measured at 0.86-0.95 of the probe
    even by its best reading, on the 2-core Xeon, quiet; a probe of a slower kernel or product fails here)."""
    from npuinfer import dummy
    from npuinfer.generate import prefill

    cpu, dtype = get_device("cpu"), torch.bfloat16
    args = QWEN_7B.with_(n_layers=1, vocab_size=4096)
    model = dummy.build_dummy_model(args, cpu, dtype, seed=0)
    model.resolve_kernels("fused")
    batch, tokens = 4, 32
    ids = torch.randint(0, args.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    model.setup_caches(batch, tokens + 1)
    probe = flops_probe_ops(cpu, dtype, flops_probe_size(cpu))
    assert flops_probe_size(cpu) >= 2048 and all("bfloat16" in op.label for op in probe)
    real = TimedOp("prefill", prefill_flops(args, batch, tokens), lambda: prefill(model, ids, None))
    readings = rate_readings(cpu, probe + [real], FLOPS_PROBE_REPEATS, FLOPS_PROBE_SECONDS)
    probed = max(max(readings[op.label]) for op in probe)
    median = statistics.median(readings["prefill"])
    assert probed >= median, (f"the FLOP/s probe ({probed / 1e9:.1f} GFLOP/s) is beaten by a real-size prefill's "
                              f"median ({median / 1e9:.1f}): {readings}")


def test_best_rates_takes_the_best_reading_of_each_op_in_turn():
    calls = []
    ops = [TimedOp("a", 1.0, lambda: calls.append("a")), TimedOp("b", 2.0, lambda: calls.append("b"))]
    rates = best_rates(get_device("cpu"), ops, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one untimed call each, then in turn
    calls.clear()
    best_rates(get_device("cpu"), ops, 1, min_seconds=60, max_repeats=4)  # the cap ends a long minimum
    assert calls == ["a", "b"] * 5
    assert rates["b"] > 0 and rates["a"] > 0 and set(rates) == {"a", "b"}


def test_bench_rows_carry_the_roofline_columns_and_markdown_shows_mbu(tmp_path, npuinfer_cache):
    results = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "bench/test_performance.py",
                           "--model", "qwen-tiny", "--batch-sizes", "2", "--case-pairs", "16x8", "--rounds", "1",
                           "--results-dir", str(results)], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(results / "performance_qwen-tiny_cpu.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    assert header[:8] == ["batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)", "ResponseTime(s)",
                          "forward_first_token_time(ms)", "forward_next_token_time(ms)", "pre_next_token_time(ms)",
                          "post_next_token_time_post(ms)"]
    at = header.index("weights")  # then the roofline's columns, then a served deployment's (empty here)
    assert header[at + 14] == "spec_source" and header[at + 15:] == SERVING_COLUMNS
    row = rows[0]
    args = registry_args(MODELS["qwen-tiny"])
    assert int(row["weight_bytes_per_step"]) == weight_bytes_per_step(args, 2, 4)
    assert float(row["kv_bytes_per_step"]) == kv_bytes_per_step(args, 2, 20, 4)
    moved = int(row["weight_bytes_per_step"]) + float(row["kv_bytes_per_step"])
    achieved = moved / float(row["forward_next_token_time(ms)"]) * 1e3
    assert float(row["MBU"]) == pytest.approx(achieved / (float(row["peak_bandwidth(GB/s)"]) * 1e9), rel=1e-6)
    assert 0 < float(row["MBU"]) <= 1 and row["peak_bandwidth_source"].startswith("probe: ")
    assert float(row["prefill_FLOPs"]) == prefill_flops(args, 2, 16) and 0 < float(row["MFU"]) <= 1
    markdown = (results / "performance_qwen-tiny_cpu.md").read_text()
    assert re.search(r"\| MBU +\|", markdown) and "peak used: " in markdown and "weights: checkpoint" in markdown



def test_a_row_beyond_the_peaks_is_warned_about_and_never_clipped(tmp_path, npuinfer_cache):
    """Peaks far below what any run reaches, recorded in the shared peaks file the suite's processes read
    (1 kB/s, 1 MFLOP/s, for one thread): the row's MBU and MFU are their true values, above 1, and the run warns
    that the probe is what is wrong."""
    peaks = tmp_path / "peaks.json"
    peaks.write_text(json.dumps({"bandwidth cpu torch.float32 1 threads": [1e3, "probe: doctored"],
                                 "flops cpu torch.float32 1 threads": [1e6, "probe: doctored"]}))
    results = tmp_path / "r"
    env = {**os.environ, "NPUINFER_PEAKS_FILE": str(peaks), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "bench/test_performance.py",
                           "--model", "qwen-tiny", "--batch-sizes", "1", "--case-pairs", "8x4", "--rounds", "1",
                           "--warmup", "0", "--results-dir", str(results)], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(results / "performance_qwen-tiny_cpu.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["peak_bandwidth_source"] == "probe: doctored" and row["peak_TFLOP/s_source"] == "probe: doctored"
    args = registry_args(MODELS["qwen-tiny"])
    moved = weight_bytes_per_step(args, 1, 4) + kv_bytes_per_step(args, 1, 10, 4)
    assert float(row["MBU"]) == pytest.approx(moved / float(row["forward_next_token_time(ms)"]) * 1e3 / 1e3, rel=1e-6)
    assert float(row["MFU"]) == pytest.approx(prefill_flops(args, 1, 8) / float(row["forward_first_token_time(ms)"])
                                              * 1e3 / 1e6, rel=1e-6)
    assert float(row["MBU"]) > 1 and float(row["MFU"]) > 1  # not clipped
    assert "MBU" in proc.stdout and re.search(r"RooflineWarning: qwen-tiny-bs1-in8-out4: MBU [\d.]+ > 1", proc.stdout)
    assert re.search(r"RooflineWarning: qwen-tiny-bs1-in8-out4: MFU [\d.]+ > 1: .*probe: doctored", proc.stdout)

@pytest.mark.e2e
def test_realsize_separate_runs_each_backend_in_its_own_process_and_pairs_them(npuinfer_cache):
    """comparisons/realsize_vs_hf.py --separate (qwen-tiny's shapes here): npuinfer and transformers take turns in
    processes of their own, and each pair's ratio is the two runs of that round."""
    proc = subprocess.run([sys.executable, "comparisons/realsize_vs_hf.py", "--model", "qwen-tiny", "--dtype", "fp32",
                           "--separate", "--rounds", "2", "--batches", "1", "2", "--input", "8", "--output", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {(int(r), name, int(b)): float(nxt) for r, name, b, nxt in
            re.findall(r"^round (\d) (\w+) +bs(\d): first +[\d.]+ ms, next +([\d.]+) ms", proc.stdout, re.M)}
    assert len(runs) == 2 * 2 * 2
    order = [(int(r), name) for r, name in re.findall(r"^round (\d) (\w+) +bs1:", proc.stdout, re.M)]
    assert order == [(0, "npuinfer"), (0, "hf"), (1, "hf"), (1, "npuinfer")]  # taking turns, swapped each round
    pairs = re.findall(r"^pair (\d) bs(\d): next-token npuinfer / transformers ([\d.]+)", proc.stdout, re.M)
    assert len(pairs) == 4
    for r, b, ratio in pairs:
        expected = runs[int(r), "npuinfer", int(b)] / runs[int(r), "hf", int(b)]
        assert float(ratio) == pytest.approx(expected, rel=5e-3, abs=1e-3)  # times printed to 1 us, ratios to 1e-3
    assert "median of 2 pairs" in proc.stdout and "| npuinfer | 2 |" in proc.stdout
