"""Benchmarking a served deployment (MindIE Service, vllm-ascend, vLLM, any OpenAI-compatible server).

``workload`` makes prompts of exact token length (salted per run), ``stream`` times one streamed completion
chunk by chunk, ``load`` drives a case (closed loop at a concurrency, or open loop at a request rate; over
``--client-procs`` processes), ``metrics`` turns the records into vLLM bench serve's figures, ``server_metrics``
reads the server's own Prometheus ``/metrics``, and ``search`` finds the largest concurrency within latency limits.
The pytest wiring is npuinfer.pytest_plugin.serving.
"""
