"""The paper's comparison on a real model small enough for a CPU: SmolLM2-135M-Instruct customised to
HH-RLHF's harmless preference by Q-Adapter, DPO, SFT and Replay, then measured on both axes, over seeds;
and the chi2 term's form and weight. Every step is a train.py, sample.py or evaluate.py command, printed
before it runs, so any row can be rerun by hand.

    python tools/smollm2_study.py --model SMOLLM2_DIR --data harmless-base-test.jsonl.gz --out study
    python tools/smollm2_study.py --model SMOLLM2_DIR --data harmless-base-test.jsonl.gz --out study \
        --frontier --dsp dsp-test.json.gz
    python tools/smollm2_study.py --model SMOLLM2_DIR --learn dsp-test.json.gz --out study --seeds 1

--learn: DSP's academy style at a budget where DPO learns it (learning_step): queries 0-399 train (1,596
pairs), 600-660 held out (244), every reply cut to its first 48 words; 200 steps of 8 pairs at 1e-3,
pairs of at most 256 tokens. DPO first, then a reward model trained on the same pairs (train.py
--objective rm) as the judge, Q-Adapter, SFT and Replay, and Q-Adapter at two and four times the steps
where it learns less than DPO; every adapter at scales 0.5, 1 and 2 (Q-Adapter also at alpha0 0.1 and
1): held-out implicit reward accuracy and the reward model's win rate of the greedy replies to the 61
held-out queries (learned), the reply NLL and facts accuracy (kept); a table (learning.md), a PNG, and
the wall time of each part.

--frontier: the frontier step instead of the comparison: the four methods (first seed) on the harmless
pairs (the comparison's runs, kept and shared) and on DSP with the academy reply preferred (queries 0-49
train, 600-609 are held out; pairs of at most 128 tokens), each adapter measured at scales 0.5, 1 and 2
and Q-Adapter also at alpha0 0.1 and 1 (scale 1), on 40 held-out pairs each: held-out
implicit reward accuracy against the reply NLL of the base model's own replies, a table and a PNG per
data set.

--model: HuggingFaceTB/SmolLM2-135M-Instruct (online), or a local copy in the Hugging Face layout.
--data: HH-RLHF pairs (the harmless-base split); records 0-199 train, records 2000-2099 are held out.

What each run measures (evaluate.py, all adapters in one call, the base model first):
    implicit reward accuracy   held-out pairs with z(chosen) > z(rejected), z = log pi - log pi1: what
                          the run learned, relative to the base model (the base model: 0.5)
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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qadapter_min.frontier import frontier_of  # noqa: E402
from qadapter_min.plots import frontier_plot  # noqa: E402

STUDY = ROOT / "tools" / "study"
TRAIN = (0, 200)  # record ranges of the data file
HELD_OUT = (2000, 2100)
COMMON = ["--max_steps", "40", "--batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-3"]
MAX_LEN = "160"
# the frontier step: its held-out slices, DSP's query ranges (4 pairs a query) and the knobs' settings
FRONTIER_HELD_OUT = (2000, 2040)
DSP_TRAIN, DSP_HELD_OUT, DSP_MAX_LEN = (0, 50), (600, 610), "128"
SCALES, ALPHA0S = ["0.5", "1", "2"], ["0.1", "1"]
# the learning step (--learn): DSP's queries 0-399 train (4 pairs each, academy preferred), 600-660 are
# held out; every reply cut to its first 48 words (the 2-core budget; DSP's replies run to 126 on average)
LEARN_TRAIN, LEARN_HELD_OUT, LEARN_WORDS = (0, 400), (600, 661), 48
LEARN_STEPS = 200  # one epoch of the 1,596 training pairs, 8 a step
LEARN_FLAGS = ["--batch_size", "8", "--micro_batch_size", "4", "--lr", "1e-3", "--max_len", "256"]
LEARN_FLAGS += ["--domain", "academy"]
LEARN_REPLY_TOKENS = "96"  # the judged greedy replies' length
METHODS = {  # name: train.py flags beyond COMMON ("Replay": SFT on the data and the base model's own replies)
    "Q-Adapter": ["--objective", "qadapter"],
    "DPO": ["--objective", "dpo"],
    "SFT": ["--objective", "sft"],
    "Replay": ["--objective", "sft"],
}
CHI2_VARIANTS = {  # the chi2 term's form and weight (Q-Adapter above is the authors' form at beta 0.1)
    "Q-Adapter, beta 0": ["--objective", "qadapter", "--beta", "0"],
    "Q-Adapter, beta 0.01": ["--objective", "qadapter", "--beta", "0.01"],
    "Q-Adapter, bellman chi2, beta 0.01": ["--objective", "qadapter", "--chi2", "bellman", "--beta", "0.01"],
    "Q-Adapter, bellman chi2, beta 0.1": ["--objective", "qadapter", "--chi2", "bellman", "--beta", "0.1"],
}


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method.lower().replace(', ', '-').replace(' ', '_')}-seed{seed}"


def run(command: list[str]):
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code:  # the command said why; the study stops there, keeping what is finished
        sys.exit(code)


def slice_records(source: Path, target: Path, start: int, stop: int, words: int | None = None):
    """Records start..stop-1 of a JSON Lines or JSON array file, gzipped or not, as JSON Lines; words:
    each DSP reply cut to its first `words` words, the white space between them kept."""
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # DSP's one JSON array
        records = json.loads(text)[start:stop]
        for record in records if words else []:
            record["responses"] = {k: cut(v, words) for k, v in record["responses"].items()}
        lines = [json.dumps(record) + "\n" for record in records]
    else:
        lines = text.splitlines(keepends=True)[start:stop]
    target.write_text("".join(lines))


def cut(text: str, words: int) -> str:
    """The text up to the end of its words-th word."""
    return re.match(r"\s*(\S+\s+){0,%s}\S*".replace("%s", str(words - 1)), text).group(0).rstrip()


def sample(model: str, prompts: Path, target: Path, unique: bool):
    """The base model's greedy replies of 64 tokens: the retention prompts', or Replay's data."""
    if not target.exists():
        run(
            [sys.executable, "sample.py", "--model", model, "--prompts", str(prompts)]
            + ["--out", str(target), "--temperature", "0", "--max_new_tokens", "64"]
            + (["--unique"] if unique else [])
        )


def train(model: str, directory: Path, data: list[Path], flags: list[str], common=COMMON):
    """One train.py run, unless its output (an adapter, or a reward model) is already there."""
    if not any((directory / name).exists() for name in ("adapter_model.safetensors", "config.json")):
        run(
            [sys.executable, "train.py", "--model", model, "--data", *map(str, data)]
            + [*common, *flags, "--out", str(directory), "--overwrite"]
        )


def last_eval(directory: Path) -> dict:
    """A run's last eval row (train.py's metrics.jsonl)."""
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval_loss" in row][-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="SmolLM2-135M-Instruct: a Hub id or a local directory")
    p.add_argument("--data", type=Path, help="HH-RLHF harmless-base pairs (JSON Lines, .gz ok)")
    p.add_argument("--out", default="study", type=Path, help="where data slices, runs and results go")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds of the methods' runs")
    p.add_argument(
        "--chi2_seeds", nargs="*", type=int, default=[1], help="seeds of the chi2 variants' runs (none: skip them)"
    )
    p.add_argument("--frontier", action="store_true", help="the frontier step instead of the comparison (needs --dsp)")
    p.add_argument("--dsp", type=Path, help="DSP's pairs (its test split, JSON, .gz ok)")
    p.add_argument(
        "--learn",
        type=Path,
        metavar="DSP",
        help="the learning step instead (DSP's test split, JSON, .gz ok; --data is not read)",
    )
    args = p.parse_args()
    if args.data is None and args.learn is None:
        p.error("pass --data (HH-RLHF pairs), or --learn DSP for the learning step")
    if args.frontier != (args.dsp is not None):
        p.error("--frontier and --dsp go together: the frontier step's second data set is DSP's")
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    base_replies = out / "base_replies.jsonl"
    sample(args.model, STUDY / "retention_prompts.jsonl", base_replies, unique=False)
    started = time.time()
    if args.learn:
        learning_step(args, out, base_replies, started)
        return
    train_data, held_out = out / "train.jsonl", out / "held_out.jsonl"
    slice_records(args.data, train_data, *TRAIN)
    slice_records(args.data, held_out, *HELD_OUT)
    replay = out / "replay.jsonl"
    sample(args.model, train_data, replay, unique=True)
    if args.frontier:
        frontier_step(args, out, started)
        return

    flags = {**METHODS, **CHI2_VARIANTS}
    runs = [
        (method, seed, run_dir(out, method, seed))
        for method, seed in [
            *itertools.product(METHODS, args.seeds),
            *itertools.product(CHI2_VARIANTS, args.chi2_seeds),
        ]
    ]
    for method, seed, directory in runs:
        data = [train_data] + ([replay] if method == "Replay" else [])
        train(args.model, directory, data, [*flags[method], "--max_len", MAX_LEN, "--seed", str(seed)])
    results_file = out / "results.json"
    run(
        [
            sys.executable,
            "evaluate.py",
            "--model",
            args.model,
            "--adapter",
            *[str(d) for _, _, d in runs],
            "--pairs",
            str(held_out),
            "--max_len",
            MAX_LEN,
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


def frontier_step(args, out: Path, started: float):
    """Both frontiers: HH-RLHF's harmless pairs (the comparison's first-seed runs) and DSP's academy."""
    seed = args.seeds[0]
    dsp = out / "dsp"
    (dsp / "runs").mkdir(parents=True, exist_ok=True)
    slice_records(args.data, out / "frontier_held_out.jsonl", *FRONTIER_HELD_OUT)
    slice_records(args.dsp, dsp / "train.jsonl", *DSP_TRAIN)
    slice_records(args.dsp, dsp / "held_out.jsonl", *DSP_HELD_OUT)
    sample(args.model, dsp / "train.jsonl", dsp / "replay.jsonl", unique=True)
    data_sets = {  # name: (where its runs go, its own flags, held-out pairs)
        "hh-harmless": (out, ["--max_len", MAX_LEN], out / "frontier_held_out.jsonl"),
        "dsp-academy": (dsp, ["--max_len", DSP_MAX_LEN, "--domain", "academy"], dsp / "held_out.jsonl"),
    }
    tables = []
    for name, (where, flags, held_out) in data_sets.items():
        runs = [run_dir(where, method, seed) for method in METHODS]
        for method, directory in zip(METHODS, runs):
            data = [where / "train.jsonl"] + ([where / "replay.jsonl"] if method == "Replay" else [])
            train(args.model, directory, data, [*METHODS[method], *flags, "--seed", str(seed)])
        measure = [sys.executable, "evaluate.py", "--model", args.model, "--pairs", str(held_out)]
        measure += [*flags, "--reply_nll", str(out / "base_replies.jsonl")]
        along_scale, along_alpha0 = (out / f"frontier-{name}-scale.json", out / f"frontier-{name}-alpha0.json")
        run(measure + ["--adapter", *map(str, runs), "--scale", *SCALES, "--output", str(along_scale)])
        # alpha0 moves Q-Adapter alone, at scale 1: its own alpha0's point is in the call above
        run(measure + ["--adapter", str(runs[0]), "--alpha0", *ALPHA0S, "--output", str(along_alpha0)])
        results = json.loads(along_scale.read_text())["models"] + [
            r for r in json.loads(along_alpha0.read_text())["models"] if r["adapter"]
        ]
        front = frontier_of(results, "implicit_reward_accuracy", "reply_nll")
        frontier_plot(front, out / f"frontier-{name}.png")
        methods = {str(directory): method for method, directory in zip(METHODS, runs)}
        tables.append(f"{name} (seed {seed}; {out / f'frontier-{name}.png'}):\n\n" + frontier_markdown(front, methods))
    text = "\n".join(tables) + f"\n(this call took {(time.time() - started) / 60:.0f} minutes)\n"
    (out / "frontier.md").write_text(text)
    print(text)


def learning_step(args, out: Path, base_replies: Path, started: float):
    """DSP's academy style at a budget where DPO learns it: a reward model trained on the training pairs,
    then the four methods (and Q-Adapter at two and four times the steps where it learned less than DPO),
    each measured on held-out pairs relative to the base model, judged by the reward model, and on what it
    kept; the frontier over scale and alpha0, a table and a PNG."""
    learn = out / "dsp-learn"
    (learn / "runs").mkdir(parents=True, exist_ok=True)
    train_pairs, held_out = learn / "train.jsonl", learn / "held_out.jsonl"
    slice_records(args.learn, train_pairs, *LEARN_TRAIN, words=LEARN_WORDS)
    slice_records(args.learn, held_out, *LEARN_HELD_OUT, words=LEARN_WORDS)
    replay = learn / "replay.jsonl"  # the base model's greedy replies to the training queries
    common = [*LEARN_FLAGS, "--eval_data", str(held_out)]
    steps = ["--max_steps", str(LEARN_STEPS)]
    timings = {}

    def timed_train(name: str, directory: Path, data: list[Path], flags: list[str]):
        begun = time.time()
        train(args.model, directory, data, flags, common)
        timings.setdefault(name, time.time() - begun)

    reward_model = learn / "runs" / "reward-model"
    runs = {}  # label: directory, DPO first: the baseline the budget is set by
    for seed in args.seeds:
        for method in ["DPO", "Q-Adapter"] + ["SFT", "Replay"] * (seed == args.seeds[0]):
            if method == "Q-Adapter":  # the judge, second: what it can tell apart bounds what a policy shows
                timed_train("reward model", reward_model, [train_pairs], ["--objective", "rm", *steps])
            if method == "Replay":
                sample(args.model, train_pairs, replay, unique=True)
            directory = run_dir(learn, method, seed)
            data = [train_pairs] + ([replay] if method == "Replay" else [])
            flags = [*METHODS[method], *steps, "--seed", str(seed)]
            timed_train(f"{method}, seed {seed}", directory, data, flags)
            runs[f"{method}, seed {seed}"] = directory
    first = args.seeds[0]
    qadapter, dpo = (last_eval(runs[f"{m}, seed {first}"]) for m in ("Q-Adapter", "DPO"))
    if qadapter["eval_implicit_reward_accuracy"] < dpo["eval_implicit_reward_accuracy"]:
        for times in (2, 4):  # where Q-Adapter gets with more of the same steps
            directory = learn / "runs" / f"q-adapter-x{times}-seed{first}"
            flags = [*METHODS["Q-Adapter"], "--max_steps", str(times * LEARN_STEPS), "--seed", str(first)]
            timed_train(f"Q-Adapter x{times} steps, seed {first}", directory, [train_pairs], flags)
            runs[f"Q-Adapter x{times} steps, seed {first}"] = directory
    measure = [sys.executable, "evaluate.py", "--model", args.model, "--pairs", str(held_out)]
    measure += ["--domain", "academy", "--max_len", "256", "--reply_nll", str(base_replies)]
    measure += ["--tasks", "facts_mc", "--include_path", str(STUDY)]
    measure += ["--prompts", str(held_out), "--reward_model", str(reward_model)]
    measure += ["--max_new_tokens", LEARN_REPLY_TOKENS, "--learned", "implicit_reward_accuracy"]
    measure += ["--kept", "reply_nll"]
    first_runs = {label: d for label, d in runs.items() if label.endswith(f"seed {first}")}
    calls = {  # the results file: evaluate.py's flags beyond `measure`
        learn / "scale.json": ["--adapter", *map(str, first_runs.values()), "--scale", *SCALES],
        learn / "alpha0.json": ["--adapter", str(first_runs[f"Q-Adapter, seed {first}"]), "--alpha0", *ALPHA0S],
    }
    other_seeds = [str(d) for label, d in runs.items() if label not in first_runs]
    if other_seeds:  # the first seed's runs at scale 1 are in scale.json
        calls[learn / "seeds.json"] = ["--adapter", *other_seeds]
    for results_file, flags in calls.items():
        if not results_file.exists():
            begun = time.time()
            run(measure + flags + ["--output", str(results_file)])
            timings[f"measure {results_file.stem}"] = time.time() - begun
    results = json.loads((learn / "scale.json").read_text())["models"] + [
        r for r in json.loads((learn / "alpha0.json").read_text())["models"] if r["adapter"]
    ]
    front = frontier_of(results, "implicit_reward_accuracy", "reply_nll")
    frontier_plot(front, learn / "frontier.png")
    methods = {str(d): label.rsplit(", seed", 1)[0] for label, d in runs.items()}
    rm_eval = last_eval(reward_model)
    text = (
        f"reward model: held-out pair accuracy {rm_eval['eval_reward_accuracy']:.3f} "
        f"(margin {rm_eval['eval_reward_margin']:.2f}) on {held_out.name}\n\n"
        + learning_markdown(results, front, methods)
        + "\n"
        + seeds_markdown([r for f in calls if f.stem != "alpha0" for r in json.loads(f.read_text())["models"]], runs)
        + "\nwall time on this machine (minutes): "
        + ", ".join(f"{name} {seconds / 60:.0f}" for name, seconds in timings.items())
        + f"; this call {(time.time() - started) / 60:.0f}\n"
    )
    (learn / "learning.md").write_text(text)
    print(text)


def learning_markdown(results: list[dict], front: dict, methods: dict[str, str]) -> str:
    """A row per point: what it learned (held-out implicit reward accuracy and margin, the reward model's
    win rate of its greedy replies against the base model's) and what it kept (reply NLL, facts_mc), with
    a star where no other point beats it on implicit reward accuracy and reply NLL together."""
    lines = [
        "| point | implicit reward accuracy | implicit margin | win rate (RM) | reply NLL | facts_mc |",
        "|---|---|---|---|---|---|",
    ]
    for r, point in zip(results, front["points"]):
        label = "base model" if r["adapter"] is None else methods[r["adapter"]]
        if r["adapter"] is not None:
            label += f", scale {r['scale']:g}" + (f", alpha0 {r['alpha0']:g}" if r["alpha0"] is not None else "")
        star = " *" if point["on_frontier"] else ""
        p = r["preference"]
        lines.append(
            f"| {label}{star} | {p['implicit_reward_accuracy']:.3f} | {p['implicit_reward_margin']:.2f} | "
            f"{r['reward']['win_rate_against_base']:.3f} | {r['reply_nll']['nll_per_token']:.3f} | "
            f"{r['lm_eval']['facts_mc']['acc,none']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def seeds_markdown(models: list[dict], runs: dict[str, Path]) -> str:
    """Each run at scale 1 and its own alpha0: implicit reward accuracy and win rate."""
    by_adapter = {r["adapter"]: r for r in models if r["adapter"] and r["scale"] == 1}
    lines = ["| run (scale 1) | implicit reward accuracy | win rate (RM) |", "|---|---|---|"]
    for label, directory in runs.items():
        r = by_adapter[str(directory)]
        lines.append(
            f"| {label} | {r['preference']['implicit_reward_accuracy']:.3f} | "
            f"{r['reward']['win_rate_against_base']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def frontier_markdown(front: dict, methods: dict[str, str]) -> str:
    """A row per adapter and alpha0, a column per scale: held-out implicit reward accuracy / reply NLL, in bold
    where no other point is as good on both and better on one. methods: {adapter: its method's name}."""
    scales = sorted({p["scale"] for p in front["points"] if p["adapter"]})
    rows = {}
    for p in front["points"][1:]:
        label = methods[p["adapter"]] + (f", alpha0 {p['alpha0']:g}" if p["alpha0"] is not None else "")
        cell = f"{p['learned']:.2f} / {p['kept']:.3f}"
        rows.setdefault(label, {})[p["scale"]] = f"**{cell}**" if p["on_frontier"] else cell
    base = front["points"][0]
    lines = [
        "| implicit reward accuracy / reply NLL | " + " | ".join(f"scale {s:g}" for s in scales) + " |",
        "|---" * (len(scales) + 1) + "|",
    ]
    lines += [f"| {label} | " + " | ".join(cells.get(s, "") for s in scales) + " |" for label, cells in rows.items()]
    lines.append(f"\n(the base model: {base['learned']:.2f} / {base['kept']:.3f})")
    return "\n".join(lines) + "\n"


def study_table(models: list[dict], runs: list[tuple[str, int, Path]]) -> str:
    """A markdown row per method: each measure's mean over the method's runs, ± their standard deviation."""
    results = {r["name"]: r for r in models}

    def numbers(result):
        return (
            result["preference"]["implicit_reward_accuracy"],
            result["preference"]["preference_accuracy"],
            result["reply_nll"]["added_to_base"],
            result["lm_eval"]["facts_mc"]["acc,none"],
        )

    base = numbers(results["base"])
    lines = [
        "| method | held-out implicit reward accuracy | held-out preference accuracy | added NLL per token "
        "of the base model's replies | facts accuracy |",
        "|---|---|---|---|---|",
        f"| base | {base[0]:.2f} | {base[1]:.2f} | 0 | {base[3]:.2f} |",
    ]
    for method in dict.fromkeys(m for m, _, _ in runs):
        columns = zip(*[numbers(results[str(d)]) for m, _, d in runs if m == method])
        cells = [f"{statistics.mean(c):.2f}" + (f" ± {statistics.stdev(c):.2f}" if len(c) > 1 else "") for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
