"""C-Eval through a served deployment: npuinfer's ``--backend openai`` against lm-evaluation-harness 0.4.13's
``local-completions`` on the same real vLLM server (its CPU build, tests/vllm_server.py), at the same concurrency
and prompts per request; and npuinfer in-process on the same checkpoint. Figures:
docs/MEASUREMENTS.md#c-eval-through-a-served-deployment-npuinfer-vs-lm-eval

    python comparisons/ceval_served_vs_lmeval.py --lmeval-python VENV/bin/python [--per-subject N] [--subjects 52]
        [--shots 5] [--concurrent 4] [--batch 8] [--repeat 2] [--prefix-caching] [--logprob-requests per-choice]

VENV: a virtual environment with ``lm-eval[api]==0.4.13`` (never a dependency of npuinfer). The data is a
synthetic C-Eval val split in the official layout, at the official per-subject counts (1346 questions) unless
``--per-subject`` says otherwise; lm-eval reads the same rows (copied to JSON lines, so no CSV reader turns "NA" or
"007" into something else) through one task per subject with lm-eval's own ceval-valid prompt (description,
``question.strip()``, choices, 答案：, five first dev rows as shots). The served model: a GPT-NeoX saved by
transformers with gpt-neox-tiny's tokenizer (as tests/test_openai_backend.py serves), prefix caching off so every
run sees the same server, or with ``--prefix-caching`` on (vLLM's default) and emptied before every timed run.
npuinfer asks with ``--logprob-requests per-context`` (one request per question) unless told ``per-choice``
(lm-eval's requests).

Each timed run is a whole process (start, tokenizer, requests, results written), npuinfer and lm-eval in ABBA order,
after one untimed subject that warms the server.
Printed: questions, identical predictions (npuinfer served vs lm-eval, served vs in-process), log-likelihood
differences, each run's wall time and the lm-eval / npuinfer ratio.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from npuinfer.ceval.cache import read_cache
from npuinfer.ceval.dataset import CHOICES
from npuinfer.ceval.subjects import SUBJECT_NAMES, get_subject
from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.reports.paired import pair_runs, percentile

REPO = Path(__file__).resolve().parents[1]
SERVED = "neox-tiny-served"
LMEVAL_TEMPLATE = """dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    val: {val}
    dev: {dev}
validation_split: val
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
description: "以下是中国关于{name_zh}的单项选择题，请选出其中的正确答案。\\n\\n"
task: {task}
"""


def lmeval_tasks(data: Path, subjects: list[str], out: Path) -> list[str]:
    """One lm-eval task per subject over JSON-lines copies of the CSV rows (strings kept as strings)."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in subjects:
        files = {}
        for split in ("val", "dev"):
            with open(data / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as fh:
                rows = [{k: r[k] for k in ("id", "question", *CHOICES, "answer")} for r in csv.DictReader(fh)]
            files[split] = out / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        task = f"npuinfer_ceval_{subject}"
        (out / f"{task}.yaml").write_text(LMEVAL_TEMPLATE.format(val=files["val"], dev=files["dev"], task=task,
                                                                 name_zh=get_subject(subject).name_zh),
                                          encoding="utf-8")
        names.append(task)
    return names


def timed(cmd: list[str], log: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    return took


def npuinfer_cmd(results: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--results-dir", str(results),
            "--ceval-dir", str(data), *args]


def lmeval_predictions(out: Path) -> dict[tuple[str, str], tuple[str, tuple[float, ...]]]:
    """(subject, id) -> (prediction, the choices' log-likelihoods), from lm-eval's --log_samples files."""
    got = {}
    for path in out.rglob("samples_npuinfer_ceval_*.jsonl"):
        subject = path.name[len("samples_npuinfer_ceval_"):].rsplit("_", 1)[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            lls = tuple(float(r[0]) for r in sample["filtered_resps"])
            best = max(range(len(lls)), key=lambda c: (lls[c], -c))
            got[(subject, str(sample["doc"]["id"]))] = (CHOICES[best], lls)
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON"),
                        help="python of a venv with lm-eval[api]==0.4.13 (default $LMEVAL_PYTHON)")
    parser.add_argument("--per-subject", type=int, default=None,
                        help="val questions per subject (default: the official counts, 1346 in all)")
    parser.add_argument("--subjects", type=int, default=len(SUBJECT_NAMES), help="the first N subjects (default 52)")
    parser.add_argument("--shots", type=int, default=5, help="k-shot, both tools (default 5)")
    parser.add_argument("--concurrent", type=int, default=4, help="requests in flight, both tools (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per request, both tools (default 8)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each tool, ABBA order (default 2)")
    parser.add_argument("--logprob-requests", default="per-context", choices=("per-context", "per-choice"),
                        help="npuinfer's --logprob-requests (default per-context; per-choice: lm-eval's requests)")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="serve with vLLM's prefix cache on (its default), emptied before every timed run "
                             "(/reset_prefix_cache) so no run reads another's prompts (default: cache off)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    if not args.lmeval_python:
        parser.error("--lmeval-python (or $LMEVAL_PYTHON): the python of a venv with lm-eval[api]==0.4.13")
    sys.path.insert(0, str(REPO / "tests"))
    from vllm_server import VllmServer, write_served_checkpoint

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="served_vs_lmeval_"))
    work.mkdir(parents=True, exist_ok=True)
    subjects = list(SUBJECT_NAMES[:args.subjects])
    data = write_synthetic_ceval(work / "ceval", subjects=subjects, val_per_subject=args.per_subject, seed=28)
    questions = 0
    for subject in subjects:
        with open(data / "val" / f"{subject}_val.csv", encoding="utf-8", newline="") as fh:
            questions += sum(1 for _ in csv.DictReader(fh))
    model = write_served_checkpoint(work / "neox-64")
    tasks = lmeval_tasks(data, subjects, work / "lmeval_tasks")
    if args.prefix_caching:
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for POST /reset_prefix_cache
    server = VllmServer(model, SERVED, work / "server.log",
                        extra_args=() if args.prefix_caching else ("--no-enable-prefix-caching",))
    try:
        server.wait_healthy()
        print(f"{questions} questions, {len(subjects)} subjects, {args.shots}-shot; vLLM at {server.base_url}, prefix "
              f"cache {'on, emptied before each run' if args.prefix_caching else 'off'}; {args.concurrent} requests "
              f"in flight, {args.batch} prompts per request; npuinfer --logprob-requests {args.logprob_requests}",
              flush=True)
        served = ("--backend", "openai", "--base-url", server.base_url, "--served-model", SERVED, "--tokenizer",
                  str(model), "--num-concurrent", str(args.concurrent), "--ceval-batch-size", str(args.batch),
                  "--shot", str(args.shots), "--logprob-requests", args.logprob_requests)
        lmeval = [args.lmeval_python, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                  f"model={SERVED},base_url={server.base_url}/completions,tokenizer={model},"
                  f"tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent={args.concurrent},"
                  "max_length=2048,max_retries=3", "--batch_size", str(args.batch), "--num_fewshot", str(args.shots),
                  "--include_path", str(work / "lmeval_tasks"), "--tasks", ",".join(tasks), "--log_samples"]
        lm_env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        lm_env.pop("PYTHONPATH", None)
        # untimed: the server's first requests are slower (allocation, first kernels), which would bias run 1
        timed(npuinfer_cmd(work / "warm-up", data, *served, "-k", subjects[0]), work / "warm-up.log")
        times: dict[str, list[float]] = {"npuinfer": [], "lm-eval": []}
        order = [("npuinfer", "lm-eval"), ("lm-eval", "npuinfer")] * ((args.repeat + 1) // 2)
        runs = [tool for pair in order for tool in pair][:2 * args.repeat]
        for i, tool in enumerate(runs):
            out = work / f"{tool}-{i}"
            if args.prefix_caching:
                import httpx
                httpx.post(server.base_url.rsplit("/v1", 1)[0] + "/reset_prefix_cache", timeout=60).raise_for_status()
            if tool == "npuinfer":
                took = timed(npuinfer_cmd(out, data, *served), work / f"{tool}-{i}.log")
            else:
                took = timed([*lmeval, "--output_path", str(out)], work / f"{tool}-{i}.log", lm_env)
            times[tool].append(took)
            print(f"run {i + 1}: {tool} {took:.1f} s", flush=True)
    finally:
        server.stop()
    local = work / "in-process"
    local_s = timed(npuinfer_cmd(local, data, "--model-path", str(model), "--device", "cpu", "--dtype", "fp32",
                                 "--shot", str(args.shots)),
                    work / "in-process.log")

    first_npu = next(work.glob("npuinfer-*/ceval_*"))
    ours = {r.key: r for r in read_cache(first_npu)}
    theirs = lmeval_predictions(next(work.glob("lm-eval-*")))
    same = sum(ours[k].prediction == theirs[k][0] for k in ours if k in theirs)
    differ = [k for k in ours if k in theirs and ours[k].prediction != theirs[k][0]]
    lp = [abs(a - b) for k in ours if k in theirs for a, b in zip(ours[k].logprobs or (), theirs[k][1])]
    print(f"npuinfer served vs lm-eval local-completions: {len(ours)} and {len(theirs)} questions, {same} predicted "
          f"alike, {len(differ)} not {differ[:10]}; |log-likelihood difference| max {max(lp):.3g}, "
          f"p99 {percentile(lp, 99):.3g} over {len(lp)} choices")
    paired = pair_runs(next(local.glob("ceval_*")), first_npu)
    o = paired.overall
    print(f"npuinfer in-process vs served: {o.questions} questions, {o.agree} predicted alike; "
          + (paired.drift.describe() if paired.drift else f"drift not available: {paired.drift_missing}"))
    med_n, med_l = statistics.median(times["npuinfer"]), statistics.median(times["lm-eval"])
    print(f"whole run, median of {args.repeat}: npuinfer {med_n:.1f} s {times['npuinfer']}, lm-eval {med_l:.1f} s "
          f"{times['lm-eval']}: lm-eval / npuinfer = {med_l / med_n:.2f}x; in-process (cpu, fp32) {local_s:.1f} s")
    print(f"work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
