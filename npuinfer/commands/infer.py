"""`npuinfer infer`: greedy continuations of one or several prompts."""
from __future__ import annotations

import argparse
import sys

from ..options import UsageError
from ..generate import generate
from ..options import RunConfig, add_device_options, add_model_options, add_runtime_options, positive_int
from ..parallel.dist import init_tensor_parallel, is_rank0
from ..tokenizer import not_utf8
from ..roofline import probe_bandwidth, roofline_figures, shared_peak
from ..locate import locate_config
from ..runtime import load
from ..results.table import significant
from ..tiny import MARKER as TINY_MARKER
from ..timing import Timer

DEFAULT_PROMPT = "苹果公司的CEO是"


def add_parser(sub) -> None:
    parser = sub.add_parser("infer", help="print greedy continuations of prompts")
    add_model_options(parser.add_argument)
    add_device_options(parser.add_argument)
    add_runtime_options(parser.add_argument)
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--no-stop", action="store_true", help="ignore EOS and emit exactly --max-new-tokens")
    parser.add_argument("prompts", nargs="*", default=[DEFAULT_PROMPT], metavar="PROMPT")
    parser.set_defaults(run=run)


def weights_label(loaded) -> str:
    """Where the weights came from, for people: tiny random, the checkpoint directory, or dummy at real size."""
    if loaded.dummy_seed is not None:
        return f"dummy at real size (seeded random, seed {loaded.dummy_seed}; no checkpoint read)"
    if (loaded.model_dir / TINY_MARKER).is_file():
        return f"tiny random ({loaded.name}, a stand-in built by npuinfer: {loaded.model_dir})"
    return f"checkpoint {loaded.model_dir}"


def random_weights_note(loaded) -> str | None:
    """Said before the text when the weights are random, so that noise is not taken for a broken run."""
    if loaded.dummy_seed is not None:
        return (f"note: {loaded.name} runs with --dummy-weights (seeded random weights at the real size): the text "
                "below is noise; the timing after it is the point.")
    if (loaded.model_dir / TINY_MARKER).is_file():
        return (f"note: {loaded.name} is the tiny stand-in with random weights (no download needed): the text below "
                "is noise; the timing after it is the point. For real text give a checkpoint: --model NAME "
                "--model-path DIR (or $NPUINFER_MODELS_DIR/NAME).")
    return None


def timing_block(loaded, run) -> str:
    """First-token and next-token time, tokens/s, and MBU against the bandwidth probed now, one per line."""
    device, dtype = loaded.device, loaded.dtype
    bandwidth = shared_peak("bandwidth", device, dtype, lambda: probe_bandwidth(device, dtype))
    fig = roofline_figures(loaded.args, run.batch, run.input_len, run.output_len, loaded.dtype, run.first_token_ms,
                           run.next_token_ms, bandwidth, bandwidth)  # the FLOP/s peak is not shown here
    nxt = run.next_token_ms
    rows = [
        ("first token", f"{significant(run.first_token_ms)} ms (prefill of {run.input_len} tokens x batch {run.batch})"),
        ("next token", f"{significant(nxt)} ms (mean of {run.output_len - 1} steps)" if nxt is not None
         else "n/a (one token)"),
        ("throughput", f"{significant(run.throughput)} tokens/s ({run.batch} x {run.output_len} tokens in "
                       f"{significant(run.response_s)} s)"),
        ("MBU", (significant(fig['MBU']) if fig["MBU"] is not None else "n/a")
         + f" of {significant(bandwidth.value / 1e9)} GB/s measured ({bandwidth.source})"),
        ("weights", weights_label(loaded)),
    ]
    head = f"timing ({loaded.name} on {device}, {loaded.dtype_name}):"
    return "\n".join([head] + [f"  {label + ':':<12} {value}" for label, value in rows])


def run(args: argparse.Namespace) -> int:
    empty = [n for n, prompt in enumerate(args.prompts, 1) if not prompt]
    if empty:
        raise UsageError(f"PROMPT {', '.join(map(str, empty))} of {len(args.prompts)}: the prompt is empty; "
                         "give the text to continue")
    for n, prompt in enumerate(args.prompts, 1):
        problem = not_utf8(prompt)
        if problem:
            raise UsageError(f"PROMPT {n} of {len(args.prompts)}: not valid UTF-8 ({problem}); give the prompt as UTF-8 "
                             "text (convert a file or a terminal in another encoding, e.g. iconv -f GBK -t UTF-8)")
    config = RunConfig.from_namespace(args)
    # A missing or unusable checkpoint is one message (cli.main prints it) before any device or rank starts.
    locate_config(config)
    device = init_tensor_parallel(config.tp, config.device)
    loaded = load(config, device)
    tok = loaded.tokenizer
    input_ids, mask = tok.encode_batch(list(args.prompts))
    no_tokens = [n for n, length in enumerate(mask.sum(dim=1).tolist(), 1) if length == 0]
    if no_tokens:
        raise UsageError(f"PROMPT {', '.join(map(str, no_tokens))}: the prompt encodes to no tokens")
    timer = Timer(loaded.device)
    timer.start()
    out = generate(loaded.model, input_ids, args.max_new_tokens, mask, eos_id=tok.eos_id, stop_at_eos=not args.no_stop,
                   observer=timer)
    timer.stop()
    if not is_rank0():  # every rank computed the same tokens; one prints them
        return 0
    note = random_weights_note(loaded)
    if note:
        print(note, file=sys.stderr, flush=True)
    for prompt, ids in zip(args.prompts, out.tolist()):
        if not args.no_stop and tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        print(f"{prompt}{tok.decode(ids)}", flush=True)
    # on stderr: stdout stays the continuations alone, for pipes and for comparing runs
    print(timing_block(loaded, timer.result(*input_ids.shape)), file=sys.stderr)
    return 0
