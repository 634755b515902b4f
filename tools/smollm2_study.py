"""The paper's comparison on a real model small enough for a CPU: SmolLM2-135M-Instruct customised to
HH-RLHF's harmless preference by Q-Adapter, DPO, SFT and Replay, then measured on both axes, over seeds;
and the chi2 term's form and weight. Every step is a train.py, sample.py or evaluate.py command, printed
before it runs, so any row can be rerun by hand.

    python tools/smollm2_study.py --model SMOLLM2_DIR --data harmless-base-test.jsonl.gz --out study

--model: HuggingFaceTB/SmolLM2-135M-Instruct (online), or a local copy in the Hugging Face layout.
--data: HH-RLHF pairs (the harmless-base split); records 0-199 train, records 2000-2099 are held out.

What each run measures (evaluate.py, all adapters in one call, the base model first):
    preference accuracy   held-out pairs with R(chosen) > R(rejected) under the run's policy
    added NLL             retention: evaluate.py --reply_nll over the base model's own greedy replies to 24
                          unrelated prompts (tools/study/retention_prompts.jsonl), less the base model's
    facts accuracy        retention: 40 multiple-choice questions through lm-eval (tools/study/facts_mc.yaml)

Settings, as close to the paper's as a 2-core CPU allows: LoRA r 8 / alpha 16 / dropout 0.05 on q_proj and
v_proj, alpha 1, alpha0 0.01, beta 0.1, gamma 1 (the paper's); but 40 steps of 4 pairs (the paper: 512
pairs a step over 2 epochs of the split's 42k pairs), AdamW at 1e-3 (the paper's 3e-4 moves a 40-step run
too little), pairs of at most 160 tokens (the paper: 512), fp32 weights. Finished runs are kept: a
second call runs only what is missing. On 2 CPU cores a run takes about 4 minutes.
"""

import argparse
import gzip
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "tools" / "study"
TRAIN = (0, 200)  # record ranges of the data file
HELD_OUT = (2000, 2100)
COMMON = [
    "--max_steps",
    "40",
    "--batch_size",
    "4",
    "--micro_batch_size",
    "2",
    "--max_len",
    "160",
    "--lr",
    "1e-3",
]
METHODS = {  # name: train.py flags beyond COMMON ("Replay": SFT on the data and the base model's own replies)
    "Q-Adapter": ["--objective", "qadapter"],
    "DPO": ["--objective", "dpo"],
    "SFT": ["--objective", "sft"],
    "Replay": ["--objective", "sft"],
}
CHI2_VARIANTS = {  # the chi2 term's form and weight (Q-Adapter above is the authors' form at beta 0.1)
    "Q-Adapter, beta 0": ["--objective", "qadapter", "--beta", "0"],
    "Q-Adapter, beta 0.01": ["--objective", "qadapter", "--beta", "0.01"],
    "Q-Adapter, bellman chi2, beta 0.01": [
        "--objective",
        "qadapter",
        "--chi2",
        "bellman",
        "--beta",
        "0.01",
    ],
    "Q-Adapter, bellman chi2, beta 0.1": [
        "--objective",
        "qadapter",
        "--chi2",
        "bellman",
        "--beta",
        "0.1",
    ],
}


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method.lower().replace(', ', '-').replace(' ', '_')}-seed{seed}"


def run(command: list[str]):
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def slice_records(source: Path, target: Path, start: int, stop: int):
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt") as f:
        target.write_text("".join(itertools.islice(f, start, stop)))


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", required=True, help="SmolLM2-135M-Instruct: a Hub id or a local directory"
    )
    p.add_argument(
        "--data", required=True, type=Path, help="HH-RLHF harmless-base pairs (JSON Lines, .gz ok)"
    )
    p.add_argument(
        "--out", default="study", type=Path, help="where data slices, runs and results go"
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of the methods' runs"
    )
    p.add_argument(
        "--chi2_seeds",
        nargs="*",
        type=int,
        default=[1],
        help="seeds of the chi2 variants' runs (none: skip them)",
    )
    args = p.parse_args()
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    python = sys.executable
    train_data, held_out = out / "train.jsonl", out / "held_out.jsonl"
    slice_records(args.data, train_data, *TRAIN)
    slice_records(args.data, held_out, *HELD_OUT)
    base_replies, replay = out / "base_replies.jsonl", out / "replay.jsonl"
    if not base_replies.exists():
        run(
            [
                python,
                "sample.py",
                "--model",
                args.model,
                "--prompts",
                str(STUDY / "retention_prompts.jsonl"),
                "--out",
                str(base_replies),
                "--temperature",
                "0",
                "--max_new_tokens",
                "64",
            ]
        )
    if not replay.exists():
        run(
            [
                python,
                "sample.py",
                "--model",
                args.model,
                "--prompts",
                str(train_data),
                "--out",
                str(replay),
                "--temperature",
                "0",
                "--max_new_tokens",
                "64",
                "--unique",
            ]
        )

    started = time.time()
    flags = {**METHODS, **CHI2_VARIANTS}
    runs = [
        (method, seed, run_dir(out, method, seed))
        for method, seed in [
            *itertools.product(METHODS, args.seeds),
            *itertools.product(CHI2_VARIANTS, args.chi2_seeds),
        ]
    ]
    for method, seed, directory in runs:
        if not (directory / "adapter_model.safetensors").exists():
            data = [str(train_data)] + ([str(replay)] if method == "Replay" else [])
            run(
                [
                    python,
                    "train.py",
                    "--model",
                    args.model,
                    "--data",
                    *data,
                    *COMMON,
                    *flags[method],
                    "--seed",
                    str(seed),
                    "--out",
                    str(directory),
                    "--overwrite",
                ]
            )
    results_file = out / "results.json"
    run(
        [
            python,
            "evaluate.py",
            "--model",
            args.model,
            "--adapter",
            *[str(d) for _, _, d in runs],
            "--pairs",
            str(held_out),
            "--max_len",
            "160",
            "--reply_nll",
            str(base_replies),
            "--tasks",
            "facts_mc",
            "--include_path",
            str(STUDY),
            "--output",
            str(results_file),
        ]
    )
    table = study_table(json.loads(results_file.read_text())["models"], runs) + (
        f"\n(mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; the chi2 variants: seed "
        f"{', '.join(map(str, args.chi2_seeds))}; this call took {(time.time() - started) / 60:.0f} minutes)\n"
    )
    (out / "table.md").write_text(table)
    print(table)


def study_table(models: list[dict], runs: list[tuple[str, int, Path]]) -> str:
    """A markdown row per method: each measure's mean over the method's runs, ± their standard deviation."""
    results = {r["name"]: r for r in models}

    def numbers(result):
        return (
            result["preference"]["preference_accuracy"],
            result["reply_nll"]["added_to_base"],
            result["lm_eval"]["facts_mc"]["acc,none"],
        )

    base = numbers(results["base"])
    lines = [
        "| method | held-out preference accuracy | added NLL per token of the base model's replies | facts accuracy |",
        "|---|---|---|---|",
        f"| base | {base[0]:.2f} | 0 | {base[2]:.2f} |",
    ]
    for method in dict.fromkeys(m for m, _, _ in runs):
        columns = zip(*[numbers(results[str(d)]) for m, _, d in runs if m == method])
        cells = [
            f"{statistics.mean(c):.2f}" + (f" ± {statistics.stdev(c):.2f}" if len(c) > 1 else "")
            for c in columns
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
