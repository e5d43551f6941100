"""Options defined once, for the `npuinfer` CLI and the pytest plugin alike (pytest-benchmark's pattern).

Each ``add_*_options(addoption)`` takes ``argparse.ArgumentParser.add_argument`` or a pytest option group's
``addoption`` (same signature): the option names, dests, defaults and parsers are the same in both. The values
come back as one ``RunConfig`` built from either an argparse Namespace or a pytest Config, which the loader takes
(``runtime.load``, ``locate.locate_config``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Callable

from .memory import parse_size
from .registry import DEFAULT_MODEL

AddOption = Callable[..., Any]  # ArgumentParser.add_argument or pytest's OptionGroup.addoption


class UsageError(ValueError):
    """Bad command-line input; printed as a usage error (exit code 2)."""


# --------------------------------------------------------------------------------------------- value parsers


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer parser refusing values below ``minimum`` (a usage error naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer_at_least_{minimum}"
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """``1,4,8`` -> (1, 4, 8), duplicates dropped."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,4; got {text!r}")
    return tuple(dict.fromkeys(values))


def memory_limit(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------------------------- the options

MODELS_DEST = "npuinfer_models"  # pytest: --model may repeat (a list)
MODEL_DEST = "npuinfer_model"  # CLI: one --model
# --backend openai: how choices are scored: one request per shared context (default), or one per choice (lm-eval)
LOGPROB_REQUESTS = ("per-context", "per-choice")


def add_model_options(addoption: AddOption, *, several: bool = False, model_help: str | None = None,
                      path_help: str | None = None) -> None:
    """--model and --model-path. ``several``: --model may repeat (the pytest suites), dest npuinfer_models."""
    if several:
        addoption("--model", action="append", default=None, dest=MODELS_DEST, metavar="NAME",
                  help=model_help or "registry name; repeat for several (default: the tiny models, or every model "
                                     "found under $NPUINFER_MODELS_DIR)")
    else:
        addoption("--model", default=None, dest=MODEL_DEST, metavar="NAME",
                  help=model_help or f"registry name (default {DEFAULT_MODEL} unless --model-path is given)")
    addoption("--model-path", default=None, dest="npuinfer_model_path", metavar="DIR",
              help=path_help or "checkpoint directory as downloaded from the Hub (with a single --model, or alone: "
                                "family from config.json)")


def add_device_options(addoption: AddOption) -> None:
    """--device and --dtype."""
    addoption("--device", default="auto", dest="npuinfer_device", metavar="DEVICE",
              help="auto | cpu | cuda[:N] | npu[:N] (default auto)")
    addoption("--dtype", default=None, dest="npuinfer_dtype", choices=["fp32", "fp16", "bf16"],
              help="default fp16 on accelerators, fp32 on cpu")


def add_runtime_options(addoption: AddOption) -> None:
    """How the model runs: --max-seq-len, --attention, --kernels, --compile, --dummy-weights, --memory-limit, --tp."""
    addoption("--max-seq-len", type=positive_int, default=None, dest="npuinfer_max_seq_len", metavar="N",
              help="cap the KV cache (also $MAX_SEQ_LEN)")
    addoption("--attention", default="sdpa", choices=["sdpa", "eager"], dest="npuinfer_attention",
              help="scaled_dot_product_attention (default) or the eager path")
    addoption("--kernels", default="fused", choices=["fused", "plain"], dest="npuinfer_kernels",
              help="fused: the device's fused ops, each checked against plain torch at load (default); "
                   "plain: plain torch ops")
    addoption("--compile", action="store_true", default=False, dest="npuinfer_compile",
              help="run the decode step as one graph (cpu: an AOTInductor library; cuda: CUDA graphs; npu: "
                   "torchair); each new shape builds first (in the bench suite: in the warm-up)")
    addoption("--dummy-weights", action="store_true", default=False, dest="npuinfer_dummy_weights",
              help="the model's real shapes with seeded random weights made on the device, no checkpoint "
                   "(refused before allocating when the weights cannot fit --memory-limit / the device; a real "
                   "name without a download uses its tiny stand-in's tokenizer)")
    addoption("--dummy-seed", type=non_negative_int, default=0, dest="npuinfer_dummy_seed", metavar="N",
              help="seed of --dummy-weights (default 0): rows and caches record it, so runs with other seeds never mix")
    addoption("--memory-limit", type=memory_limit, default=None, dest="npuinfer_memory_limit", metavar="16GiB",
              help="memory the model may use: --dummy-weights refuses, before allocating, what cannot fit (the model; "
                   "in bench/ each case, at its batch and lengths); the "
                   "max-batch search stays within it (required on cpu; on a device: min with its memory)")
    addoption("--tp", type=positive_int, default=1, dest="npuinfer_tp", metavar="N",
              help="tensor parallel ranks: `npuinfer infer` runs under torchrun --nproc-per-node N, each rank "
                   "loading DIR/part_model/{rank} (npuinfer cut); the pytest suites re-run themselves under "
                   "torchrun with N processes, rows from rank 0, timings the max over ranks")


def add_backend_option(addoption: AddOption) -> None:
    """--backend: the engine both suites measure (npuinfer.backends; names are checked against its table)."""
    addoption("--backend", default="npuinfer", dest="npuinfer_backend", metavar="NAME",
              help="npuinfer (npuinfer's runtime, default), hf (transformers on the same checkpoint), or a "
                   "backend a plugin registers under the npuinfer.backends entry-point group")


def add_endpoint_options(addoption: AddOption) -> None:
    """Where a served deployment is (--backend openai)."""
    addoption("--base-url", default=None, dest="npuinfer_base_url", metavar="URL",
              help="--backend openai: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    addoption("--served-model", default=None, dest="npuinfer_served_model", metavar="NAME",
              help="--backend openai: the model name the server lists in /v1/models")
    addoption("--tokenizer", default=None, dest="npuinfer_tokenizer", metavar="DIR",
              help="--backend openai: the served model's directory (config.json + tokenizer files): prompts are "
                   "sent as token ids made with it")
    addoption("--api-key-env", default=None, dest="npuinfer_api_key_env", metavar="NAME",
              help="--backend openai: the environment variable holding the API key (never written anywhere)")
    addoption("--request-timeout", type=positive_float, default=600.0, dest="npuinfer_request_timeout",
              metavar="S", help="--backend openai: seconds to wait for an answer before retrying (default 600)")
    addoption("--num-concurrent", type=positive_int, default=1, dest="npuinfer_num_concurrent", metavar="N",
              help="--backend openai: requests in flight at once (default 1)")
    addoption("--max-length", type=positive_int, default=None, dest="npuinfer_max_length", metavar="N",
              help="--backend openai: lm-eval's max_length, the most tokens a request holds: a longer prompt loses "
                   "its first tokens (default 2048, lm-eval's, or the server's max_model_len when smaller)")
    addoption("--logprob-requests", choices=LOGPROB_REQUESTS, default=LOGPROB_REQUESTS[0],
              dest="npuinfer_logprob_requests",
              help="--backend openai, log-likelihood scoring: per-context (default) asks once per question for the "
                   "log-probs of every one-token choice at the next position (vLLM's logprob_token_ids; the prompt "
                   "may come from the server's prefix cache), falling back to per-choice where a choice is longer or "
                   "the server does not answer so; per-choice sends each choice with echo + logprobs, request for "
                   "request as lm-eval's local-completions")
    addoption("--chat", action="store_true", default=False, dest="npuinfer_chat",
              help="--backend openai with --scoring generate: ask /v1/chat/completions (the prompt as one user "
                   "message) instead of /v1/completions")


def add_baseline_option(addoption: AddOption) -> None:
    """--baseline, shared by the bench and accuracy suites."""
    addoption("--baseline", default=None, dest="npuinfer_baseline", metavar="DIR",
              help="reference results (a results directory or results/baselines/<name>): a bench case fails when "
                   "slower than --max-regression, a C-Eval case when its accuracy drops more than --max-acc-drop; "
                   "a case with no baseline row is not gated (warning)")


# --------------------------------------------------------------------------------------------- the values


@dataclass(frozen=True)
class RunConfig:
    """Which model, where and how it runs: what the loader needs, from the CLI or from a pytest session."""

    model: str | None = None  # registry name; None with model_path alone (family from config.json)
    model_path: str | None = None
    device: str = "auto"
    dtype: str | None = None
    max_seq_len: int | None = None
    attention: str = "sdpa"
    compile: bool = False
    kernels: str = "fused"
    dummy_weights: bool = False
    dummy_seed: int = 0
    memory_limit: int | None = None
    tp: int = 1
    backend: str = "npuinfer"
    base_url: str | None = None  # --backend openai: where the server is, which model, its tokenizer
    served_model: str | None = None
    tokenizer: str | None = None
    api_key_env: str | None = None
    request_timeout: float = 600.0
    num_concurrent: int = 1
    max_length: int | None = None  # --backend openai: lm-eval's max_length (None: 2048 or the server's, less)
    chat: bool = False  # --backend openai, --scoring generate: /v1/chat/completions
    logprob_requests: str = "per-context"  # --backend openai: one request per context, or lm-eval's per choice

    @classmethod
    def from_options(cls, get: Callable[[str], Any], model: str | None = None) -> "RunConfig":
        """From an option getter (dest -> value): every field but ``model`` is read from the dest
        ``npuinfer_<field>``, so a new run option is its addoption line plus its field here. ``model``: the run's
        model (the CLI's --model, or a pytest case's)."""
        values = {}
        for f in fields(cls):
            if f.name == "model":
                continue
            try:
                value = get(f"npuinfer_{f.name}")
            except ValueError:  # pytest: an option this session did not register
                value = None
            if value is not None:
                values[f.name] = value
        return cls(model=model, **values)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "RunConfig":
        """The CLI's values; no --model and no --model-path means the default model."""
        name = getattr(args, MODEL_DEST, None)
        if name is None and args.npuinfer_model_path is None:
            name = DEFAULT_MODEL
        return cls.from_options(lambda dest: getattr(args, dest, None), model=name)  # a command may lack some

    @classmethod
    def from_pytest(cls, config: Any, model: str | None) -> "RunConfig":
        """A pytest session's values for one of its models (``model``: a registry name, or None for the
        --model-path directory alone)."""
        return cls.from_options(config.getoption, model=model)
