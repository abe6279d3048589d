"""Adaptation quality on the embedded SmolLM2-135M: NeuroAda against PEFT LoRA, same loop and data.

    python benchmarks/quality.py run --task commonsense --method neuroada --k 1 --lr 3e-3 --steps 300
    python benchmarks/quality.py run --task commonsense --method lora --rank 8 --lr 3e-4 --steps 300
    python benchmarks/quality.py run --task arithmetic --method base --eval dev
    python benchmarks/quality.py run --task arithmetic --method neuroada --adapter adapters/gsm8k.safetensors --eval dev
    python benchmarks/quality.py search --task commonsense --method neuroada --k 1 --lrs 1e-3 3e-3 1e-2
    python benchmarks/quality.py table [--task commonsense] [--markdown]

A run trains once (resumable: `neuroada.trainer` checkpoints every 25 steps) and evaluates on
the validation split (`--eval val`: 500 examples of `commonsense_15k_validation.json`, or the
last 300 examples of `math_10k.json`, which arithmetic training never sees) and/or the dev sets
(`--eval dev`: ARC-Easy; AddSub, SingleEq, MultiArith), `--eval-limit` examples each. `--eval
loglik` (commonsense) also scores ARC-Easy in this process by log-likelihood, two ways that need no
generated format (`arc_loglik`): a diagnostic of why generation sits at chance there. Every
method trains with the same seed, data order, template, loss masking (response tokens only),
AdamW (weight decay 0), linear schedule with warmup 0.06, batch and max length; LoRA trains its
factors through that very loop (`benchmarks/peers/lora_train.py`). Evaluation is greedy, through
`neuroada serve` (16 concurrent requests into its continuous batch): NeuroAda adapters from a
store, LoRA merged into the weights and served as the base model. Scoring: `neuroada.evaluate`
(last number for arithmetic, first `answerN` for multiple choice), with a 95% Wilson interval.

`search` is the learning-rate search: one run per rate (each as `run` would make it, so finished
rates are read back, not retrained), the rates ranked by validation accuracy, and with `--then-steps`
the best rate trained longer and evaluated on `--then-eval`.

Each run's config, training summary and results go to `benchmarks/quality/<run id>.json`
(committed); checkpoints, adapters and merged models to `benchmarks/quality/work/` (not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import closed_loop, machine  # noqa: E402
from serve_load import start_server  # noqa: E402

from neuroada.data import build_prompt, file_sha256, load_examples  # noqa: E402
from neuroada.evaluate import is_correct  # noqa: E402

RESULTS = Path(__file__).with_name("quality")
WORK = RESULTS / "work"
HELD_BACK = 300  # the last examples of math_10k.json: arithmetic's validation split


@dataclass(frozen=True)
class Task:
    train: str
    val: str
    val_size: int
    dev: tuple[str, ...]
    max_new_tokens: int


TASKS = {
    "commonsense": Task("commonsense_15k_train.json", "commonsense_15k_validation.json", 500, ("arc_easy_test",), 16),
    "arithmetic": Task(
        "math_10k.json", "math_10k.json", HELD_BACK, ("addsub_test", "singleeq_test", "multiarith_test"), 160
    ),
}


def run_id(args) -> str:
    if args.method == "base":
        return f"{args.task}-base"
    if args.adapter is not None:  # named by its content too: a file replaced since is another run
        return f"{args.task}-file-{args.adapter.stem}-{file_sha256(args.adapter)[7:15]}"
    method = f"neuroada-k{args.k}-{args.selection}" if args.method == "neuroada" else f"lora-r{args.rank}"
    return f"{args.task}-{method}-lr{args.lr:g}-steps{args.steps}-b{args.batch_size}"


def training_examples(task: str, data_dir: Path) -> list[dict]:
    examples = load_examples(data_dir / TASKS[task].train)
    return examples[:-HELD_BACK] if task == "arithmetic" else examples


def eval_examples(task: str, split: str, data_dir: Path) -> list[dict]:
    t = TASKS[task]
    if split == "val":
        examples = load_examples(data_dir / t.val)
        return examples[-HELD_BACK:] if task == "arithmetic" else examples[: t.val_size]
    return load_examples(data_dir / f"{split}.json")


# --- training ------------------------------------------------------------------------------------


def train_run(args, work: Path) -> dict:
    """Train (or resume) the run; returns its training summary. NeuroAda writes an adapter into
    work/store, LoRA a merged model folder into work/merged."""
    import torch

    from neuroada.base_model import load_base_model, load_tokenizer, resolve_model_name
    from neuroada.config import NeuroAdaConfig, default_targets
    from neuroada.data import file_sha256
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import save_adapter
    from neuroada.model import attach, export
    from neuroada.trainer import TrainConfig, train, training_summary

    torch.set_num_threads(args.threads)
    model = load_base_model(None)
    total = sum(p.numel() for p in model.parameters())  # the base's own, before any bypass or factor
    base = BaseModelSpec.from_model(model, resolve_model_name(None))
    tokenizer = load_tokenizer(None)
    examples = training_examples(args.task, args.data_dir)
    data_hash = file_sha256(args.data_dir / TASKS[args.task].train)
    config = TrainConfig(
        lr=args.lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=0.06,
        seed=0,
        checkpoint=work / "train.ckpt",
        checkpoint_every=25,
    )
    if args.method == "neuroada":
        na_config = NeuroAdaConfig(k=args.k, targets=default_targets(model.config.model_type), selection=args.selection)
        attach(model, na_config)
        result = train(model, tokenizer, examples, config)
        summary = training_summary(result, config, data_hash, TASKS[args.task].train)
        adapter = export(model, base, selection=args.selection, training=summary)
        trained_artifact(args, work).parent.mkdir(parents=True, exist_ok=True)
        save_adapter(adapter, trained_artifact(args, work))
        trainable = adapter.num_params
    else:
        from peers.lora_train import train_lora

        result, trainable = train_lora(model, tokenizer, examples, config, args.rank, trained_artifact(args, work))
        summary = training_summary(result, config, data_hash, TASKS[args.task].train)
    summary.update(
        trainable=trainable,
        trainable_percent=round(100 * trainable / total, 4),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    return summary


def trained_artifact(args, work: Path) -> Path:
    """What `train_run` leaves for evaluation: the NeuroAda adapter file, or LoRA's merged model."""
    return work / "store" / f"{run_id(args)}.safetensors" if args.method == "neuroada" else work / "merged"


# --- evaluation ------------------------------------------------------------------------------------


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


async def generate_all(url: str, prompts: list[str], adapter: str | None, max_new_tokens: int, clients: int):
    params = {"adapter": adapter} if adapter else {}

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        body = {"prompt": prompts[i], "max_new_tokens": max_new_tokens, "temperature": 0}
        r = await client.post("/generate", params=params, json=body, timeout=3600)
        r.raise_for_status()
        return i, r.json()["text"]

    done = await closed_loop(url, list(range(len(prompts))), clients, one)
    return [text for _, text in sorted(done["results"])]


def evaluate_run(args, work: Path, sets: list[tuple[str, list[dict]]], done) -> None:
    """Every (name, examples) through one `neuroada serve` of the run's model; `done(name, result)`
    after each set (correct, total, accuracy, interval, seconds); every generation in work/."""
    adapter = None if args.method != "neuroada" else run_id(args)
    store = trained_artifact(args, work).parent if args.method == "neuroada" else work / "empty-store"
    store.mkdir(parents=True, exist_ok=True)
    env = {"NEUROADA_MAX_NEW_TOKENS": "512", "NEUROADA_REQUEST_TIMEOUT_S": "3600"}
    if args.method == "lora":
        env["NEUROADA_MODEL"] = str(trained_artifact(args, work))
    proc, url = start_server("neuroada", store, args.threads, 16, env)
    try:
        for name, examples in sets:
            started = time.perf_counter()
            prompts = [build_prompt(e) for e in examples]
            texts = asyncio.run(generate_all(url, prompts, adapter, TASKS[args.task].max_new_tokens, 16))
            correct = [is_correct(t, str(e["answer"])) for t, e in zip(texts, examples)]
            lo, hi = wilson(sum(correct), len(correct))
            result = {
                "correct": sum(correct),
                "total": len(correct),
                "accuracy": sum(correct) / len(correct),
                "ci95": [round(lo, 4), round(hi, 4)],
                "seconds": round(time.perf_counter() - started, 1),
            }
            records = [
                {"answer": e["answer"], "generation": t, "correct": c} for e, t, c in zip(examples, texts, correct)
            ]
            (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            print(f"  {name}: {sum(correct)}/{len(correct)} = {result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]")
            done(name, result)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


# --- ARC-Easy by log-likelihood (a diagnostic) ---------------------------------------------------------

ARC_QUESTION = re.compile(r"question: (?P<question>.*?)\n\nAnswer1: ", re.S)
ARC_OPTION = re.compile(r"Answer(?P<n>\d): (?P<text>.*?)(?= Answer\d: |\n\nAnswer format)", re.S)


def load_run_model(args, work: Path):
    """The run's model in this process: the base, the base with the NeuroAda adapter merged, or LoRA's
    merged folder."""
    from neuroada.base_model import load_base_model, resolve_model_name
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import load_adapter
    from neuroada.inplace import apply_adapter_

    model = load_base_model(str(trained_artifact(args, work)) if args.method == "lora" else None)
    if args.method == "neuroada":
        base = BaseModelSpec.from_model(model, resolve_model_name(None))
        apply_adapter_(model, load_adapter(trained_artifact(args, work), base))
    return model.eval()


def arc_loglik(args, work: Path, examples: list[dict]) -> dict:
    """ARC-Easy scored two ways that need no generated format:
    - choice: the trained template up to "the correct answer is answer", then the option digit with
      the highest probability (what greedy decoding picks, were it forced into the format);
    - cloze: each option's text after "Question: ...\nAnswer:", by log-likelihood per character
      (lighteval's normalised accuracy), which reads knowledge rather than the answerN convention."""
    import torch

    from neuroada.base_model import load_tokenizer

    torch.set_num_threads(args.threads)
    model, tokenizer = load_run_model(args, work), load_tokenizer(None)
    digits = [tokenizer(str(n), add_special_tokens=False).input_ids[-1] for n in range(1, 10)]
    correct = {"choice": 0, "cloze": 0}
    with torch.inference_mode():
        for e in examples:
            options = {int(m["n"]): m["text"].strip() for m in ARC_OPTION.finditer(e["instruction"])}
            answer = int(str(e["answer"]).removeprefix("answer"))
            prompt = tokenizer(build_prompt(e) + "the correct answer is answer", add_special_tokens=False).input_ids
            logits = model(torch.tensor([prompt])).logits[0, -1]  # [V]
            choice = max(options, key=lambda n: logits[digits[n - 1]].item())
            correct["choice"] += choice == answer
            question = ARC_QUESTION.search(e["instruction"])["question"].strip()
            context = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False).input_ids
            scores = {}
            for n, text in options.items():
                continuation = tokenizer(" " + text, add_special_tokens=False).input_ids
                ids = torch.tensor([context + continuation])
                logprobs = model(ids).logits[0, len(context) - 1 : -1].log_softmax(-1)  # [len(continuation), V]
                total = logprobs.gather(1, ids[0, len(context) :, None]).sum().item()
                scores[n] = total / len(text)
            correct["cloze"] += max(scores, key=scores.get) == answer
    result = {}
    for name, c in correct.items():
        lo, hi = wilson(c, len(examples))
        result[f"arc_easy_test:{name}:{len(examples)}"] = {
            "correct": c,
            "total": len(examples),
            "accuracy": c / len(examples),
            "ci95": [round(lo, 4), round(hi, 4)],
        }
        print(f"  arc_easy {name}: {c}/{len(examples)} = {c / len(examples):.3f} [{lo:.3f}, {hi:.3f}]")
    return result


# --- the commands ------------------------------------------------------------------------------------


def run(args) -> None:
    rid = run_id(args)
    work = WORK / rid
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{rid}.json"
    record = json.loads(path.read_text()) if path.exists() else {"run": rid, "config": {}, "eval": {}}
    kept = ("task", "method", "k", "selection", "rank", "lr", "steps", "batch_size", "max_length")
    record["config"] = {k: v for k, v in vars(args).items() if k in kept}
    if args.adapter is not None:  # an adapter someone trained before: evaluated as it is
        store = work / "store"
        store.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.adapter, store / f"{rid}.safetensors")
        with safe_open(args.adapter, "pt") as f:
            metadata = f.metadata()
        record["config"] = {
            "task": args.task,
            "method": "neuroada",
            "adapter": str(args.adapter),
            "adapter_sha256": file_sha256(args.adapter),
            "k": int(metadata["k"]),
            "selection": metadata["selection"],
            "training": json.loads(metadata["training"]),
        }
    wanted = []
    for split in args.eval:
        if split == "loglik":
            continue
        names = ["val"] if split == "val" else list(TASKS[args.task].dev)
        for name in names:
            key = f"{name}:{args.eval_limit or 'all'}"
            if key not in record["eval"]:
                examples = eval_examples(args.task, name, args.data_dir)[: args.eval_limit]
                wanted.append((key, examples))
    arc = (
        eval_examples(args.task, "arc_easy_test", args.data_dir)[: args.eval_limit]
        if args.task == "commonsense"
        else []
    )
    loglik_wanted = "loglik" in args.eval and bool(arc) and f"arc_easy_test:cloze:{len(arc)}" not in record["eval"]
    if args.adapter is None and args.method != "base":
        if "train" not in record:
            print(f"{rid}: training")
            record["train"] = train_run(args, work)
            write(path, record)
        elif (wanted or loglik_wanted) and not trained_artifact(args, work).exists():
            # The record is committed, work/ is not: on a fresh clone the run is trained again, same
            # seed, data order and schedule; its final loss says whether this machine reproduced it.
            print(f"{rid}: training again ({trained_artifact(args, work)} is not on this machine)")
            again = train_run(args, work)
            record.setdefault("retrained", []).append(
                {key: again[key] for key in ("final_loss", "seconds", "peak_rss_mb")} | {"machine": machine()}
            )
            write(path, record)
    if wanted:
        print(f"{rid}: evaluating {', '.join(k for k, _ in wanted)}")

        def done(name: str, result: dict) -> None:  # each set's result kept as soon as it is in
            record["eval"][name] = result
            write(path, record)

        evaluate_run(args, work, wanted, done)
    if loglik_wanted:
        print(f"{rid}: ARC-Easy by log-likelihood")
        record["eval"].update(arc_loglik(args, work, arc))
        write(path, record)


def val_key(args) -> str:
    return f"val:{args.eval_limit or 'all'}"


def ranked_rates(records: dict[float, dict], key: str) -> list[tuple[float, dict]]:
    """(rate, its `key` result) from the best validation accuracy down; among equal accuracies the
    lower rate first (the safer one to train longer)."""
    scored = [(lr, r["eval"][key]) for lr, r in records.items() if key in r["eval"]]
    return sorted(scored, key=lambda item: (-item[1]["accuracy"], item[0]))


def search(args) -> None:
    args.eval = ["val"]
    records = {}
    for lr in args.lrs:
        args.lr = lr
        run(args)
        records[lr] = json.loads((RESULTS / f"{run_id(args)}.json").read_text())
    ranked = ranked_rates(records, val_key(args))
    print(f"{args.task}, {run_id(args).split('-lr')[0].removeprefix(args.task + '-')}, {args.steps} steps:")
    for lr, result in ranked:
        lo, hi = result["ci95"]
        print(f"  lr {lr:g}: val {result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (n={result['total']})")
    if args.then_steps and ranked:
        args.lr, args.steps, args.eval = ranked[0][0], args.then_steps, args.then_eval
        print(f"the best rate, {args.lr:g}, for {args.steps} steps")
        run(args)


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def describe(config: dict) -> str:
    if "adapter" in config:
        return f"the file {Path(config['adapter']).name} ({config['adapter_sha256'][7:15]})"
    if config["method"] == "neuroada":
        return f"NeuroAda k = {config.get('k')}, {config.get('selection')}"
    return f"LoRA r = {config.get('rank')}" if config["method"] == "lora" else "base"


def table(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{args.task or ''}*.json"))]
    if args.markdown:  # the rows as RESULTS.md tables them: one line per run, every set it was scored on
        sets = sorted({k for r in rows for k in r["eval"] if k.count(":") == 1})
        print(
            "| run | trainable (%) | lr | steps | "
            + " | ".join(sets)
            + " | loss first -> last | train s | peak RSS MB |"
        )
        print("|---" * (7 + len(sets)) + "|")
        for r in rows:
            c, t = r["config"], r.get("train", {})
            cells = [
                f"{r['eval'][k]['accuracy']:.1%} [{r['eval'][k]['ci95'][0]:.1%}, {r['eval'][k]['ci95'][1]:.1%}]"
                if k in r["eval"]
                else "-"
                for k in sets
            ]
            trained = f"{t['trainable']:,} ({t['trainable_percent']}%)" if t else "-"
            lr, steps = (f"{c['lr']:g}", str(t["steps"])) if t else ("-", "-")
            loss = f"{t['first_loss']:.3f} -> {t['final_loss']:.3f}" if t else "-"
            row = [
                describe(c),
                trained,
                lr,
                steps,
                *cells,
                loss,
                str(t.get("seconds", "-")),
                str(t.get("peak_rss_mb", "-")),
            ]
            print("| " + " | ".join(row) + " |")
        return
    for r in rows:
        c, t = r["config"], r.get("train", {})
        cells = [
            f"{k}: {v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] (n={v['total']})"
            for k, v in sorted(r["eval"].items())
        ]
        train = (
            f"lr {c['lr']:g}, {t.get('steps')} steps, {t.get('trainable', 0):,} params "
            f"({t.get('trainable_percent')}%), loss {t.get('first_loss')} -> {t.get('final_loss')}, "
            f"{t.get('seconds')} s, peak RSS {t.get('peak_rss_mb')} MB"
            if t
            else f"{c['adapter']}, trained before, evaluated as it is"
            if "adapter" in c
            else "no training"
        )
        print(f"{r['run']}: {describe(c)}; {train}\n    " + "\n    ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("run", help="train (or resume) one run and evaluate it")
    s = sub.add_parser("search", help="a learning-rate search on the validation split, then the best rate longer")
    for q in (p, s):
        q.add_argument("--task", choices=sorted(TASKS), required=True)
        q.add_argument("--k", type=int, default=1)
        q.add_argument("--selection", choices=["magnitude", "random", "reverse"], default="magnitude")
        q.add_argument("--rank", type=int, default=8)
        q.add_argument("--steps", type=int, default=300)
        q.add_argument("--batch-size", type=int, default=8)
        q.add_argument("--max-length", type=int, default=256)
        q.add_argument("--eval-limit", type=int, default=None, help="first N examples of each set")
        q.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        q.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--method", choices=["neuroada", "lora", "base"], required=True)
    p.add_argument("--adapter", type=Path, help="evaluate this NeuroAda adapter file instead of training one")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval", nargs="+", choices=["val", "dev", "loglik"], default=["val"])
    p.set_defaults(func=run)
    s.add_argument("--method", choices=["neuroada", "lora"], required=True)
    s.add_argument("--lrs", type=float, nargs="+", required=True, help="the rates to try")
    s.add_argument("--then-steps", type=int, help="train the best rate again for this many steps")
    s.add_argument("--then-eval", nargs="+", choices=["val", "dev", "loglik"], default=["val", "dev"])
    s.set_defaults(func=search, adapter=None)
    t = sub.add_parser("table", help="every run's results")
    t.add_argument("--task", choices=sorted(TASKS), help="this task's runs only")
    t.add_argument("--markdown", action="store_true", help="one table row per run, as RESULTS.md has them")
    t.set_defaults(func=table)
    args = parser.parse_args()
    if getattr(args, "adapter", None) is not None and args.method != "neuroada":
        parser.error("--adapter needs --method neuroada")
    args.func(args)


if __name__ == "__main__":
    main()
