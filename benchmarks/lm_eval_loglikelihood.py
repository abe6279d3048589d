"""lm-eval-harness scoring multiple choice through our `/v1/completions`, against its own HF backend.

    pip install "lm-eval[api]"   # not a dependency of the project
    python benchmarks/lm_eval_loglikelihood.py [--limit 200] [--adapter adapters/commonsense.safetensors] [--rounds 2]

ARC-Easy from ../shared/data as an lm-eval `multiple_choice` task (the question and its four answers
parsed from the LLM-Adapters prompt): lm-eval asks each answer's log-likelihood after the question and
takes the most likely (acc; acc_norm divides by the answer's length in bytes). Two sides, each a
`simple_evaluate` of the same task and limit, alternating in rounds:
- `local-completions`: lm-eval's OpenAI client against `neuroada serve` (embedded SmolLM2-135M,
  fp32, the adapter served by name as the server serves it): token-id prompts, `echo`, `logprobs: 1`,
  `max_tokens: 1`, several prompts a request;
- `hf`: lm-eval's own Hugging Face backend on the adapter merged into the weights (`apply_adapter_`,
  saved as a model folder).
Then: each side's accuracy and wall time, and per scored answer the two sides' log-likelihoods (the
largest difference) and greedy flags. Writes JSON beside this file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, print_table, write_json  # noqa: E402
from serve_load import start_server  # noqa: E402

from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.format import read_adapter  # noqa: E402
from neuroada.inplace import apply_adapter_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "arc_easy_test.json"
TASK = "arc_easy_shared"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ANSWER = re.compile(r"Answer(\d): (.*?)(?= Answer\d: |\n\nAnswer format|$)", re.S)


def arc_docs(path: Path) -> list[dict]:
    """The LLM-Adapters ARC prompt as lm-eval docs: question, choices, label (the right choice's index)."""
    docs = []
    for example in json.loads(path.read_text()):
        text = example["instruction"].split("the question: ", 1)[1]
        question, answers = text.split("\n\n", 1)
        choices = {int(n): answer.strip() for n, answer in ANSWER.findall(answers)}
        docs.append(
            {
                "question": question.strip(),
                "choices": [choices[n] for n in sorted(choices)],
                "label": sorted(choices).index(int(example["answer"].removeprefix("answer"))),
            }
        )
    return docs


def evaluate(model: str, model_args: dict, tasks: Path, limit: int, batch_size: int) -> tuple[dict, float]:
    """lm-eval's results (samples logged) and wall seconds."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks)),
        limit=limit,
        batch_size=batch_size,
        log_samples=True,
    )
    return results, time.perf_counter() - started


def scored(results: dict) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc, choice) -> (log-likelihood, greedy) from logged samples."""
    return {
        (sample["doc_id"], choice): (float(resp[0][0]), bool(resp[0][1]))
        for sample in results["samples"][TASK]
        for choice, resp in enumerate(sample["resps"])
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="ARC-Easy questions")
    parser.add_argument("--adapter", type=Path, default=ROOT / "adapters" / "commonsense.safetensors")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request (ours), per forward (hf)")
    parser.add_argument("--concurrency", type=int, default=4, help="lm-eval's concurrent requests to our server")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("lm_eval_loglikelihood.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = tmp / "arc_easy.jsonl"
        docs.write_text("".join(json.dumps(d) + "\n" for d in arc_docs(DATA)))
        tasks = tmp / "tasks"
        tasks.mkdir()
        (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=docs))
        merged = tmp / "merged"  # the peer's model: the adapter merged into the weights
        model, tokenizer = load_base_model(), load_tokenizer()
        apply_adapter_(model, read_adapter(args.adapter))
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        del model
        store = tmp / "store"
        store.mkdir()
        shutil.copy(args.adapter, store / args.adapter.name)
        proc, url = start_server("neuroada", store, args.threads, 16, ready_timeout=900)
        try:
            sides = {
                "neuroada (local-completions)": (
                    "local-completions",
                    {
                        "model": args.adapter.stem,
                        "base_url": f"{url}/v1/completions",
                        "tokenizer": str(merged),
                        "tokenizer_backend": "huggingface",
                        "tokenized_requests": True,
                        "num_concurrent": args.concurrency,
                        "max_retries": 1,
                    },
                ),
                "lm-eval hf (merged)": ("hf", {"pretrained": str(merged), "dtype": "float32", "device": "cpu"}),
            }
            runs: dict[str, list] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, (model_type, model_args) in sides.items():
                    runs[name].append(evaluate(model_type, model_args, tasks, args.limit, args.batch_size))
                    print(f"{name}: {runs[name][-1][1]:.1f} s", flush=True)
            health = httpx.get(f"{url}/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    ours, peer = (scored(runs[name][-1][0]) for name in sides)
    differences = [abs(ours[key][0] - peer[key][0]) for key in peer]
    greedy_differ = sum(ours[key][1] != peer[key][1] for key in peer)
    rows, table = [], []
    for name, results in runs.items():
        metrics = results[-1][0]["results"][TASK]
        seconds = [s for _, s in results]
        rows.append({"side": name, "metrics": metrics, "seconds": seconds})
        table.append(
            [
                name,
                f"{metrics['acc,none']:.4f}",
                f"{metrics['acc_norm,none']:.4f}",
                " / ".join(f"{s:.1f}" for s in seconds),
            ]
        )
    print(f"\nmachine: {machine()}; {args.limit} questions, {len(peer)} scored answers, adapter {args.adapter.name}\n")
    print_table(["side", "acc", "acc_norm", "wall s per round"], table)
    median = sorted(differences)[len(differences) // 2]
    print(f"\nlog-likelihoods: largest difference {max(differences):.2e}, median {median:.2e}")
    print(f"greedy flags that differ: {greedy_differ} of {len(peer)}")
    config = vars(args) | {"adapter": str(args.adapter), "out": str(args.out)}
    write_json(
        args.out,
        {
            "config": config,
            "server": {"device": health.get("device"), "dtype": health.get("dtype")},
            "sides": rows,
            "scored_answers": len(peer),
            "max_abs_loglikelihood_difference": max(differences),
            "greedy_flags_differing": greedy_differ,
        },
    )


if __name__ == "__main__":
    main()
