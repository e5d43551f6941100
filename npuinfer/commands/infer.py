"""`npuinfer infer`: greedy continuations of one or several prompts."""
from __future__ import annotations

import argparse
import sys

from ..cli import UsageError
from ..generate import generate
from ..options import RunConfig, add_device_options, add_model_options, add_runtime_options, positive_int
from ..parallel.dist import init_tensor_parallel, is_rank0
from ..tokenizer import not_utf8
from ..roofline import probe_bandwidth, roofline_figures, shared_peak
from ..locate import locate_config
from ..runtime import load_model_from
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


def timing_line(loaded, run) -> str:
    """One line: first-token and next-token time, tokens/s, and MBU against the bandwidth probed now."""
    device, dtype = loaded.device, loaded.dtype
    bandwidth = shared_peak("bandwidth", device, dtype, lambda: probe_bandwidth(device, dtype))
    fig = roofline_figures(loaded.args, run.batch, run.input_len, run.output_len, loaded.dtype, run.first_token_ms,
                           run.next_token_ms, bandwidth, bandwidth)  # the FLOP/s peak is not shown here
    nxt = run.next_token_ms
    decode = (f"next token {nxt:.2f} ms (mean of {run.output_len - 1} steps)" if nxt is not None
              else "next token n/a (one token)")
    mbu = f"MBU {fig['MBU']:.3f}" if fig["MBU"] is not None else "MBU n/a"
    return (f"timing: first token {run.first_token_ms:.2f} ms, {decode}, {run.throughput:.1f} tokens/s "
            f"({run.batch} x {run.output_len} tokens in {run.response_s:.3f} s), {mbu} of "
            f"{bandwidth.value / 1e9:.1f} GB/s ({bandwidth.source}); weights: {loaded.weights}")


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
    loaded = load_model_from(config, device)
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
    for prompt, ids in zip(args.prompts, out.tolist()):
        if not args.no_stop and tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        print(f"{prompt}{tok.decode(ids)}")
    # on stderr: stdout stays the continuations alone, for pipes and for comparing runs
    print(timing_line(loaded, timer.result(*input_ids.shape)), file=sys.stderr)
    return 0
