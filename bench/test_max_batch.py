"""Max batch: for each (input, output) the largest batch that runs within the device's memory or
--memory-limit (required on cpu), starting from a prediction (weights + KV cache + activations)
and confirmed by real runs. Rows go to <results-dir>/max_batch_<model>_<device>.csv.

    pytest bench/test_max_batch.py --model qwen-7b --device npu:0 --grid seed
    pytest bench/test_max_batch.py --memory-limit 64MiB          the tiny models on cpu
    pytest bench/test_max_batch.py --backend openai --base-url ... --served-model ... --tokenizer DIR \
        --max-tpot 50ms --max-ttft 2s                           a served deployment: the largest concurrency
"""


def test_max_batch(max_batch_case, bench):
    bench.max_batch(max_batch_case)


def test_max_concurrency(serving_search_case, serving):
    """With --backend openai (and --max-tpot / --max-ttft): the largest concurrency whose p90 TTFT and TPOT stay
    within the limits (and with --request-rates the largest whole rate), written to
    <results-dir>/max_load_<served model>_openai.csv."""
    serving.search(serving_search_case)
