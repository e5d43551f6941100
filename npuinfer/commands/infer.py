"""`npuinfer infer`: greedy continuations of one or several prompts."""
from __future__ import annotations

import argparse

from ..cli import UsageError
from ..generate import generate
from ..options import add_model_options, model_name, positive_int
from ..parallel.dist import init_tensor_parallel, is_rank0
from ..runtime import load_model, locate_model

DEFAULT_PROMPT = "苹果公司的CEO是"


def add_parser(sub) -> None:
    parser = sub.add_parser("infer", help="print greedy continuations of prompts")
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--no-stop", action="store_true", help="ignore EOS and emit exactly --max-new-tokens")
    parser.add_argument("--tp", type=positive_int, default=1,
                        help="tensor parallel size: run under torchrun --nproc-per-node N; each rank loads "
                             "DIR/part_model/{rank} (npuinfer cut)")
    parser.add_argument("prompts", nargs="*", default=[DEFAULT_PROMPT], metavar="PROMPT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    empty = [n for n, prompt in enumerate(args.prompts, 1) if not prompt]
    if empty:
        raise UsageError(f"PROMPT {', '.join(map(str, empty))} of {len(args.prompts)}: the prompt is empty; "
                         "give the text to continue")
    # A missing or unusable checkpoint is one message (cli.main prints it) before any device or rank starts.
    locate_model(model_name(args), args.model_path, tp=args.tp)
    device = init_tensor_parallel(args.tp, args.device)
    loaded = load_model(model_name(args), args.model_path, device, args.dtype, args.max_seq_len, args.attention,
                        compile=args.compile, kernels=args.kernels)
    tok = loaded.tokenizer
    input_ids, mask = tok.encode_batch(list(args.prompts))
    no_tokens = [n for n, length in enumerate(mask.sum(dim=1).tolist(), 1) if length == 0]
    if no_tokens:
        raise UsageError(f"PROMPT {', '.join(map(str, no_tokens))}: the prompt encodes to no tokens")
    out = generate(loaded.model, input_ids, args.max_new_tokens, mask, eos_id=tok.eos_id, stop_at_eos=not args.no_stop)
    if not is_rank0():  # every rank computed the same tokens; one prints them
        return 0
    for prompt, ids in zip(args.prompts, out.tolist()):
        if not args.no_stop and tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        print(f"{prompt}{tok.decode(ids)}")
    return 0
