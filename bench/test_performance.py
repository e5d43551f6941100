"""Performance sweep: model x batch x (input, output), one pytest case each.

    pytest bench/                                   the tiny models on the default grid (cpu: about a minute)
    pytest bench/ -k "qwen and bs8"                 only the qwen cases at batch 8
    pytest bench/ --model qwen-7b --device npu:0 --grid seed
    pytest bench/ --batch-sizes 1,4 --seq-lens 256,1024 --rounds 5 --timing normal --backend hf

Each case warms up at its shape, times --rounds generate calls (through pytest-benchmark, token
metrics in extra_info) and writes its row to <results-dir>/performance_<model>_<device>.csv at
once; the markdown table and plot are written when the session ends.
The options live in npuinfer/options.py and npuinfer/pytest_plugin/bench_options.py, the session in
npuinfer/pytest_plugin/bench.py and the measurement in npuinfer/timing.py.
"""


def test_performance(perf_case, bench, benchmark):
    bench.performance(perf_case, benchmark)
