"""A served deployment (MindIE Service, vllm-ascend, vLLM, any OpenAI-compatible server), one case per load x
(input, output):

    pytest bench/ --backend openai --base-url http://10.0.0.5:1025/v1 --served-model qwen2.5-7b \\
        --tokenizer /data/qwen2.5-7b --concurrency 1,8,32 --case-pairs 1024x256 --num-prompts 200
    pytest bench/ --backend openai ... --request-rates 1,4,inf --burstiness 0.5
    pytest bench/ --backend openai ... -k c8 --baseline results/baselines/site --max-regression 10%

Each case sends --num-prompts streamed requests of exact token lengths (salted per run) after one warm-up, and
writes its row (TTFT / TPOT / ITL / E2EL mean, median, p90, p99, throughputs, goodput, the server's /metrics) to
<results-dir>/performance_<served model>_openai.csv at once. Without --backend openai these cases are deselected.
The session lives in npuinfer/pytest_plugin/serving.py, the client in npuinfer/serving/.
"""


def test_serving(serving_case, serving):
    serving.run(serving_case)
