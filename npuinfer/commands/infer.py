"""`npuinfer infer`: greedy continuations of one or several prompts."""
from __future__ import annotations

import argparse

from ..options import add_model_options, memory_limit, model_name, positive_int

DEFAULT_PROMPT = "苹果公司的CEO是"


def add_parser(sub) -> None:
    parser = sub.add_parser("infer", help="print greedy continuations of prompts")
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--no-stop", action="store_true", help="ignore EOS and emit exactly --max-new-tokens")
    parser.add_argument("--tp", type=positive_int, default=1,
                        help="tensor parallel size: run under torchrun --nproc-per-node N; each rank loads "
                             "DIR/part_model/{rank} (npuinfer cut)")
    parser.add_argument("--dummy-weights", action="store_true",
                        help="the model's real shapes with seeded random weights made on the device, no checkpoint "
                             "(a real name without a download uses its tiny stand-in's tokenizer)")
    parser.add_argument("--memory-limit", type=memory_limit, default=None, metavar="16GiB",
                        help="memory the model may use: --dummy-weights refuses, before allocating, what cannot fit")
    parser.add_argument("prompts", nargs="*", default=[DEFAULT_PROMPT], metavar="PROMPT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..generate import generate
    from ..parallel.dist import init_tensor_parallel, is_rank0
    from ..runtime import load_model

    device = init_tensor_parallel(args.tp, args.device)
    loaded = load_model(model_name(args), args.model_path, device, args.dtype, args.max_seq_len, args.attention,
                        compile=args.compile, dummy_weights=args.dummy_weights, memory_limit=args.memory_limit)
    tok = loaded.tokenizer
    input_ids, mask = tok.encode_batch(list(args.prompts))
    out = generate(loaded.model, input_ids, args.max_new_tokens, mask, eos_id=tok.eos_id, stop_at_eos=not args.no_stop)
    if not is_rank0():  # every rank computed the same tokens; one prints them
        return 0
    for prompt, ids in zip(args.prompts, out.tolist()):
        if not args.no_stop and tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        print(f"{prompt}{tok.decode(ids)}")
    if loaded.dummy_seed is not None:
        print(f"weights: {loaded.weights}, random: the continuations above mean nothing")
    return 0
