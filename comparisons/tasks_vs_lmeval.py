"""npuinfer's accuracy tasks against lm-evaluation-harness 0.4.13: the same task definition, the same local data and
the same tiny model, compared question by question: every prompt as token ids, every prediction (multiple
choice) and, for GSM8K, every generated text and its filtered answer.

    python comparisons/tasks_vs_lmeval.py --lmeval-python LMEVAL_VENV/bin/python                 # every task
    python comparisons/tasks_vs_lmeval.py --lmeval-python LMEVAL_VENV/bin/python --task mmlu --test 40
    python comparisons/tasks_vs_lmeval.py --lmeval-python LMEVAL_VENV/bin/python --task cmmlu --test official
    python comparisons/tasks_vs_lmeval.py --lmeval-python LMEVAL_VENV/bin/python --task mmlu --test official \
        --subject anatomy --subject virology          # some subjects only (a long run in parts)
    python comparisons/tasks_vs_lmeval.py --lmeval-python LMEVAL_VENV/bin/python --task gsm8k --test 50 --json o.json

The data is a synthetic copy in each task's official layout, written by npuinfer.tasks.synth (C-Eval's by
npuinfer.ceval.synth): every subject (or the ``--subject`` ones), ``--test`` scored questions each, or with
``--test official`` each subject's count in the published test split (CMMLU, MMLU; C-Eval: always its official
val counts), the official 5 dev rows (GSM8K: ``--train`` rows). lm-eval runs in its own interpreter
(``--lmeval-python``: a venv with lm_eval 0.4.13 and transformers) on the model's checkpoint directory through
its ``hf`` model, with each task's own yaml settings pointed at the local files (``dataset_path: csv`` / ``json``
with ``data_files``; a column keeps its text: every column is read as a string, as the published datasets hold them). npuinfer scores the
same files in-process (its runtime, fp32, cpu). Token ids: lm-eval's ``_encode_pair`` (multiple choice) and
``tok_encode`` of the context (generation) against npuinfer's. Predictions: the argmax of lm-eval's
log-likelihoods against npuinfer's letter; the largest log-likelihood difference is printed. Generations: the text
lm-eval's ``generate_until`` returned (cut at the stop strings), and its strict-match filtered answer, against
npuinfer's cache row.

Figures, by machine and day: docs/MEASUREMENTS.md#tasks-against-lm-eval-0413
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("ceval", "cmmlu", "mmlu", "gsm8k", "gsm8k_cot")
LETTERS = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------- the data and tasks

def write_data(task: str, root: Path, test: int | None, train: int, subjects: list[str] | None = None) -> Path:
    """A synthetic copy of the task's data in its official layout (test None: the official test counts)."""
    from npuinfer.ceval.synth import write_synthetic_ceval
    from npuinfer.tasks.synth import write_cmmlu, write_gsm8k, write_mmlu

    out = root / ("gsm8k" if task.startswith("gsm8k") else task)
    if out.exists():
        return out
    if task == "ceval":
        return write_synthetic_ceval(out)
    if task == "cmmlu":
        return write_cmmlu(out, test, subjects=subjects)
    if task == "mmlu":
        return write_mmlu(out, test, subjects=subjects)
    return write_gsm8k(out, train, test)


def lmeval_configs(task: str, data_dir: Path, subjects: list[str] | None = None,
                   max_gen_toks: int | None = None) -> list[dict]:
    """lm-eval task configs: each of lm-eval's own task yamls' settings, dataset pointed at the local copy.

    Only the loader differs: lm-eval's MMLU rows hold ``choices`` (a list) and ``answer`` (an index) where the
    original CSV has columns A-D and a letter; the prompt reads the same text from either."""
    from npuinfer.tasks import load_task

    spec = load_task(task)
    if task == "ceval":  # lm_eval/tasks/ceval/_default_ceval_yaml and _generate_configs.py's description
        cols = ["id", "question", *LETTERS, "answer"]
        text = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
        files = {"val": "val/{s}_val.csv", "dev": "dev/{s}_dev.csv"}
        csv_kwargs = {"usecols": cols}
        description = "以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n"
        target = "{{['A', 'B', 'C', 'D'].index(answer)}}"
    elif task == "cmmlu":  # lm_eval/tasks/cmmlu/_default_template_yaml
        cols = ["id", "Question", *LETTERS, "Answer"]
        text = "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
        files = {"test": "test/{s}.csv", "dev": "dev/{s}.csv"}
        csv_kwargs = {"column_names": cols, "skiprows": 1}
        description = "以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n"
        target = "{{['A', 'B', 'C', 'D'].index(Answer)}}"
    elif task == "mmlu":  # lm_eval/tasks/mmlu/default/_default_template_yaml
        cols = ["question", *LETTERS, "answer"]
        text = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
        files = {"test": "test/{s}_test.csv", "dev": "dev/{s}_dev.csv"}
        csv_kwargs = {"column_names": cols}
        description = "The following are multiple choice questions (with answers) about {display}.\n\n"
        target = "{{['A', 'B', 'C', 'D'].index(answer)}}"
    else:
        return [gsm8k_config(task, data_dir, max_gen_toks)]
    configs = []
    for s in spec.subjects:
        if subjects and s.name not in subjects:
            continue
        data_files = {split: str(data_dir / f.format(s=s.name)) for split, f in files.items()}
        configs.append({
            "task": f"local_{task}_{s.name}", "dataset_path": "csv",
            "dataset_kwargs": {"data_files": data_files, **csv_kwargs, "keep_default_na": False, "na_filter": False,
                               "features": {c: "string" for c in cols}},
            "test_split": spec.test_split, "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": list(LETTERS),
            "doc_to_target": target, "num_fewshot": 5,
            "description": description.format(zh=s.name_zh, display=s.name.replace("_", " ")),
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        })
    return configs


def gsm8k_config(task: str, data_dir: Path, max_gen_toks: int | None = None) -> dict:
    """lm_eval/tasks/gsm8k/gsm8k.yaml or gsm8k-cot.yaml, the dataset pointed at the local jsonl files;
    ``max_gen_toks`` for both sides where given (default lm-eval's 256, the task file's)."""
    from npuinfer.tasks import load_task

    spec = load_task(task)
    config = {
        "task": f"local_{task}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl")}},
        "output_type": "generate_until", "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:" if task == "gsm8k" else "Q: {{question}}\nA:",
        "doc_to_target": "{{answer}}" if task == "gsm8k" else
                         "{{answer.split('####')[-1].strip() if answer is defined else target}}",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": list(spec.ignore_regexes)}],
        "generation_kwargs": {"until": list(spec.until), "do_sample": False, "temperature": 0.0,
                              **({"max_gen_toks": max_gen_toks} if max_gen_toks else {})},
        "repeats": 1, "num_fewshot": spec.num_fewshot,
        "filter_list": [{"name": f.name, "filter": [{"function": "regex", "regex_pattern": f.regex_pattern,
                                                      **({"group_select": f.group_select} if f.group_select else {})},
                                                     {"function": "take_first"}]} for f in spec.filters],
        "metadata": {"version": 3.0},
    }
    if task == "gsm8k":
        config.update({"training_split": "train", "fewshot_split": "train"})
    else:
        config["fewshot_config"] = {"sampler": "first_n", "samples": [dict(s) for s in spec.fewshot_samples]}
    return config


# ------------------------------------------------------------------------------------------------ lm-eval's side

def lmeval_side(job_path: str, out_path: str) -> None:
    """Run in lm-eval's interpreter: evaluate the configs, write every sample's ids, scores and texts."""
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    job = json.loads(Path(job_path).read_text())
    for c in job["configs"]:
        kwargs = c.get("dataset_kwargs", {})
        if "features" in kwargs:
            kwargs["features"] = datasets.Features({k: datasets.Value(v) for k, v in kwargs["features"].items()})
    lm = HFLM(pretrained=job["model_dir"], dtype="float32", device="cpu", batch_size=job["batch_size"],
              max_length=job["max_length"])
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=job["configs"], log_samples=True, random_seed=0,
                                      numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    wall = time.perf_counter() - start
    out: dict[str, dict] = {}
    for name, samples in results["samples"].items():
        for s in samples:
            key = f"{name}/{s['doc_id']}"
            if job["generation"]:
                context = s["arguments"][0][0]
                entry = out.setdefault(key, {"ids": lm.tok_encode(context), "text": s["resps"][0][0],
                                             "context": context})
                entry[s["filter"]] = s["filtered_resps"][0]
            else:
                pairs = [a[:2] for a in s["arguments"]]
                out[key] = {"ids": [lm._encode_pair(c, x) for c, x in pairs],
                            "lls": [r[0][0] for r in s["resps"]]}
    probe = {}
    if job.get("probe"):
        from lm_eval.api.metrics import exact_match_hf_evaluate
        from lm_eval.filters.extraction import RegexFilter

        p = job["probe"]
        probe["filtered"] = [RegexFilter(f["regex_pattern"], f["group_select"]).apply([[t] for t in p["texts"]], [])
                             for f in p["filters"]]
        probe["exact_match"] = [exact_match_hf_evaluate([a], [b], regexes_to_ignore=p["regexes_to_ignore"],
                                                        ignore_case=p["ignore_case"])["exact_match"]
                                for a, b in p["pairs"]]
    Path(out_path).write_text(json.dumps({"wall_s": wall, "samples": out, "probe": probe}, ensure_ascii=False))


def run_lmeval(python: str, configs: list[dict], model_dir: Path, generation: bool, batch_size: int,
               max_length: int, work: Path, pythonpath: str | None = None, probe: dict | None = None) -> dict:
    job, out = work / "job.json", work / "lmeval.json"
    job.write_text(json.dumps({"configs": configs, "model_dir": str(model_dir), "generation": generation,
                               "batch_size": batch_size, "max_length": max_length, "probe": probe},
                              ensure_ascii=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "hf_datasets")}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    proc = subprocess.run([python, __file__, "--lmeval-side", str(job), str(out)], env=env, text=True,
                          capture_output=True)
    if proc.returncode:
        raise SystemExit(f"lm-eval failed:\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ npuinfer's side

def npuinfer_side(task: str, data_dir: Path, loaded, batch_size: int,
                  subjects: list[str] | None = None, max_gen_toks: int | None = None) -> tuple[dict, float]:
    """Every question's ids and prediction (or generation), keyed as lm-eval's samples are."""
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.ceval.generation import context, draw_shots, score_generation
    from npuinfer.ceval.prompts import task_templates
    from npuinfer.ceval.scoring import SubjectScorer
    from npuinfer.ceval.taskdata import TaskData
    from npuinfer.tasks import load_task
    from npuinfer.tasks.extract import apply_filter

    backend = NpuinferBackend(loaded)
    spec = load_task(task)
    data = TaskData(spec, data_dir)
    split = spec.test_split
    out: dict[str, dict] = {}
    start = time.perf_counter()
    if spec.output_type == "generate_until":
        (subject,) = spec.subject_names
        problems = data.problems(subject, split)
        pool = list(spec.fewshot_samples) or [p.fields for p in data.problems(subject, spec.fewshot_split)]
        for i, (p, shots) in enumerate(zip(problems, draw_shots(spec, pool, len(problems), spec.num_fewshot))):
            text = context(spec, shots, p.fields)
            out[f"local_{task}/{i}"] = {"ids": backend.tokenizer.encode(text), "context": text}
        for scored in score_generation(backend, spec, subject, pool, problems, spec.num_fewshot,
                                       batch_size=batch_size, max_new_tokens=max_gen_toks):
            entry = out[f"local_{task}/{scored.row.question_id}"]
            entry.update(text=scored.row.generated, strict=scored.row.prediction,
                         flexible=apply_filter(spec.filters[1], scored.row.generated))
        return out, time.perf_counter() - start
    template = task_templates(spec)["lmeval"]
    for subject in data.subjects(split):
        if subjects and subject not in subjects:
            continue
        questions = data.questions(subject, split)
        scorer = SubjectScorer(backend, subject, data.questions(subject, "dev"), questions, template,
                               spec.num_fewshot, "prefix", batch_size)
        index = {q.question_id: i for i, q in enumerate(questions)}
        ids = {q.question_id: scorer.request_ids(q) for q in questions}
        for scored in scorer:
            qid = scored.row.question_id
            ctx, conts = ids[qid]
            out[f"local_{task}_{subject}/{index[qid]}"] = {"ids": [[ctx, c] for c in conts],
                                                           "lls": list(scored.logprobs),
                                                           "pred": scored.row.prediction}
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------- GSM8K's answer reading

def filter_probe(task: str, data_dir: Path) -> dict:
    """Texts whose answers both sides read (every gold answer, "The answer is N." for each, number soups) and
    (answer, reference) pairs both sides score: a tiny model's generations rarely hold an answer to read."""
    import random

    from npuinfer.tasks import load_task

    spec = load_task(task)
    golds = [json.loads(line)["answer"] for split in ("train", "test")
             for line in (data_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    numbers = ["18", "-7", "1,234", "$1,234.50", "0.5", "3.", "12.0", "007", "-0", "1,000,000", "$5"]
    texts = golds + [f"The answer is {g.split('#### ')[-1]}." for g in golds]
    texts += [" ".join(rng.choice(numbers + ["so", "The answer is", "####", "$", ".", ","]) for _ in range(8))
              for _ in range(300)]
    pairs = [(rng.choice(numbers), g) for g in golds] + [(g.split("#### ")[-1], g) for g in golds]
    return {"texts": texts, "pairs": pairs, "filters": [{"regex_pattern": f.regex_pattern,
                                                         "group_select": f.group_select} for f in spec.filters],
            "regexes_to_ignore": list(spec.ignore_regexes), "ignore_case": spec.ignore_case}


def compare_probe(task: str, probe: dict, theirs: dict) -> dict:
    from npuinfer.tasks import load_task
    from npuinfer.tasks.extract import apply_filter, exact_match, reference

    spec = load_task(task)
    differ = sum(apply_filter(f, t) != got[0]
                 for f, results in zip(spec.filters, theirs["filtered"]) for t, got in zip(probe["texts"], results))
    em = sum(exact_match(spec, a, reference(spec, b)) != bool(score)
             for (a, b), score in zip(probe["pairs"], theirs["exact_match"]))
    return {"filter_texts": len(probe["texts"]) * len(spec.filters), "filter_differs_n": differ,
            "exact_match_pairs": len(probe["pairs"]), "exact_match_differs_n": em}


# ------------------------------------------------------------------------------------------------------ compare

def compare(task: str, ours: dict, theirs: dict) -> dict:
    generation = task.startswith("gsm8k")
    keys = sorted(set(ours) | set(theirs))
    missing = [k for k in keys if k not in ours or k not in theirs]
    both = [k for k in keys if k in ours and k in theirs]
    result = {"task": task, "questions": len(both), "missing": missing[:10], "missing_n": len(missing)}
    if generation:
        result["prompt_ids_differ"] = [k for k in both if ours[k]["ids"] != theirs[k]["ids"]][:10]
        result["prompt_ids_differ_n"] = sum(ours[k]["ids"] != theirs[k]["ids"] for k in both)
        result["text_differs_n"] = sum(ours[k]["text"] != theirs[k]["text"] for k in both)
        result["text_differs"] = [k for k in both if ours[k]["text"] != theirs[k]["text"]][:10]
        result["answer_differs_n"] = sum(ours[k]["strict"] != theirs[k]["strict-match"] for k in both)
        result["flexible_differs_n"] = sum(ours[k]["flexible"] != theirs[k]["flexible-extract"] for k in both)
        result["answers_valid"] = sum(theirs[k]["strict-match"] != "[invalid]" for k in both)
        return result
    result["prompt_ids_differ_n"] = sum(ours[k]["ids"] != theirs[k]["ids"] for k in both)
    result["prompt_ids_differ"] = [k for k in both if ours[k]["ids"] != theirs[k]["ids"]][:10]
    lm_pred = {k: LETTERS[max(range(4), key=lambda c: (theirs[k]["lls"][c], -c))] for k in both}
    result["prediction_differs_n"] = sum(ours[k]["pred"] != lm_pred[k] for k in both)
    result["prediction_differs"] = [k for k in both if ours[k]["pred"] != lm_pred[k]][:10]
    result["max_ll_diff"] = max((abs(a - b) for k in both for a, b in zip(ours[k]["lls"], theirs[k]["lls"])),
                                default=0.0)
    return result


def rows_arg(value: str) -> int | None:
    """--test: a row count, or 'official' (None)."""
    if value == "official":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a row count or 'official', got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON"),
                        help="python of a venv with lm_eval 0.4.13 (default: $LMEVAL_PYTHON)")
    parser.add_argument("--lmeval-pythonpath", default=None,
                        help="more packages for lm-eval's interpreter (its hf model imports accelerate)")
    parser.add_argument("--task", action="append", choices=TASKS, help="repeatable; default: every task")
    parser.add_argument("--model", default="qwen2-tiny", help="a tiny model in transformers' own layout")
    parser.add_argument("--test", type=rows_arg, default=20,
                        help="questions per subject (GSM8K: test rows), or 'official': each CMMLU / MMLU subject's "
                             "count in the published test split")
    parser.add_argument("--subject", action="append", default=None,
                        help="repeatable; only these subjects of a multiple-choice task (default: every subject)")
    parser.add_argument("--train", type=int, default=100, help="GSM8K train rows (the 5-shot pool)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="GSM8K: tokens generated at most, both sides (default the task's, lm-eval's 256): a "
                             "tiny model never writes a stop string, so each question costs its whole length")
    parser.add_argument("--data", type=Path, default=None, help="where the synthetic copies go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("--lmeval-side", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lmeval_side:
        return lmeval_side(*args.lmeval_side)
    if not args.lmeval_python:
        parser.error("--lmeval-python (or $LMEVAL_PYTHON) is required")
    sys.path.insert(0, str(REPO))
    tasks = args.task or list(TASKS)
    if args.test is None and any(t.startswith("gsm8k") for t in tasks):
        parser.error("--test official is for cmmlu, mmlu (and ceval, always official); gsm8k needs a row count")
    if args.subject:
        from npuinfer.tasks import load_task

        if any(t.startswith("gsm8k") for t in tasks):
            parser.error("--subject is for the multiple-choice tasks; gsm8k has no subjects")
        for t in tasks:
            unknown = sorted(set(args.subject) - set(load_task(t).subject_names))
            if unknown:
                parser.error(f"--subject: {', '.join(unknown)} not a subject of {t}")
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.runtime import load_model
    from npuinfer.tasks import load_task

    loaded = load_model(args.model, device="cpu", dtype="fp32")
    model_dir = loaded.model_dir
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        for task in tasks:
            data_dir = write_data(task, root, args.test, args.train, args.subject)
            work = Path(tmp) / f"{task}_work"  # not the data's folder, which is under tmp too without --data
            work.mkdir()
            ours, our_wall = npuinfer_side(task, data_dir, loaded, args.batch_size, args.subject, args.max_gen_toks)
            probe = filter_probe(task, data_dir) if task.startswith("gsm8k") else None
            configs = lmeval_configs(task, data_dir, args.subject, args.max_gen_toks)
            lm = run_lmeval(args.lmeval_python, configs, model_dir,
                            task.startswith("gsm8k"), args.batch_size, NpuinferBackend(loaded).max_seq_len, work,
                            args.lmeval_pythonpath, probe)
            result = compare(task, ours, lm["samples"])
            result["subjects"] = len({k.rsplit("/", 1)[0] for k in ours})
            if task.startswith("gsm8k"):
                result["max_gen_toks"] = args.max_gen_toks or load_task(task).max_gen_toks
            if probe:
                result.update(compare_probe(task, probe, lm["probe"]))
            result.update(npuinfer_wall_s=round(our_wall, 1), lmeval_wall_s=round(lm["wall_s"], 1))
            results.append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
