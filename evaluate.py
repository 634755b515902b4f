"""Measure the base model and any number of adapters side by side, on both axes of the paper.

    python evaluate.py                                   # the built-in world: out/ against its base model
    python evaluate.py --adapter out out-dpo             # the built-in table, a column per adapter
    python evaluate.py --adapter out/academy --pairs test.jsonl

Every adapter is measured as the policy it was trained for: a Q-Adapter adapter as the customised
policy pi~ = softmax((Q + alpha0 log pi1) / alpha) with its own alpha and alpha0 (--alpha0 overrides
alpha0 for Q-Adapter adapters), a DPO or SFT adapter as the adapter-on model. The base model is always the
first column. Without --model the base is the adapters' own (they must share it).

What the model learned, on held-out preference pairs (--pairs, any format train.py reads):
  preference_accuracy   share of pairs with R(chosen) > R(rejected), where
                        R(y) = sum over the reply of alpha log pi(a_t|s_t) - alpha0 log pi1(a_t|s_t)
                        for the policy pi (the base model, a DPO or SFT adapter: alpha 1, alpha0 0,
                        its log-likelihood)
  preference_margin     mean of R(chosen) - R(rejected)
  implicit_reward_accuracy   what the policy learned relative to the base model: share of pairs with
                        z(chosen) > z(rejected), ties counting half (the base model: 0.5), where
                        z(y) = sum over the reply of log pi(a_t|s_t) - log pi1(a_t|s_t)
  implicit_reward_margin     mean of z(chosen) - z(rejected)
On the built-in world's model (held-out pairs: its test.jsonl unless --pairs), also its checks of
greedy replies (README, "What `python train.py` shows"):
  preference_rate       share of greedy replies that take the preferred prefix, per skill
  skill_accuracy        share of greedy replies that answer correctly, per skill

Judged replies: --prompts FILE --reward_model RM gives every model's greedy reply to each prompt, its
reward under RM (a Llama in the LlamaForSequenceClassification layout, read at the conversation's last
token), the mean reward and the win rate against the base model (ties count half); the replies and
rewards of every prompt go beside --output (results.json -> results.replies.jsonl).

What it kept, with lm-evaluation-harness (pip install -r requirements-eval.txt): --tasks and lm-eval's other
flags, under their own names; every log-likelihood and reply is the evaluated policy's. And with
--reply_nll FILE, conversations ending with a reply (sample.py's output: the base model's own greedy
replies to unrelated prompts, say): each model's mean negative log-likelihood per reply token, its closing
end-of-turn token included, and how much it adds to the base model's (how far the model moved from what
it used to say).

Along the trade-off (each value a point, a column of its own): --scale L ... scales every adapter's
update, W + L (alpha/r) B A, and --alpha0 A ... sets a Q-Adapter's alpha0; a second table then places
every point on one metric of what was learned and one of what was kept (--learned, --kept), marking
those that no other point beats on both, and --plot FILE.png draws it (qadapter_min/frontier.py).

The table goes to stdout, a column per model and a row per metric; --output FILE writes
{"models": [{"name", "policy", "adapter", "scale", "alpha0", "lm_eval": {task: {metric: value}},
"preference": {...}, "reward": {...}, "reply_nll": {...}, "world": {...}}, ...], "frontier": {...}},
each key there when it was measured.
With several processes (--nproc_per_node 4, or under torchrun) lm-eval splits its requests over the
processes; the other measurements run whole on each, and rank 0 prints and writes.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

import toyworld
from qadapter_min import UserError
from qadapter_min.common import (
    COUNT,
    FINITE_NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Parser,
    Progress,
    add_compile_flag,
    atomic_write,
    check_output_file,
    checked,
    choose_dtype,
    parse_or_default,
    run_command_line,
    write_json,
)
from qadapter_min.data import (
    EncodedConversation,
    check_data_file,
    encode_conversations,
    encode_pairs,
    load_conversations,
    load_pairs,
)
from qadapter_min.frontier import check_metric, default_metrics, format_table, frontier_of, frontier_table, short_names
from qadapter_min.judge import check_reward_model, greedy_replies, judge
from qadapter_min.plots import frontier_plot, pyplot
from qadapter_min.policy import (
    BASE,
    Policy,
    check_base,
    policy_applied,
    preference_metrics,
    read_policy,
    recorded_base_model,
    reply_nll,
)
from qadapter_min.processes import add_nproc_flag, leave_processes, start_processes
from qadapter_min.prompts import load_prompts
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model
from toyworld.report import greedy_report, world_rows


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--model", help="base model directory or Hub id (None: the adapters' base model)")
    p.add_argument("--adapter", nargs="+", help="output directories of train.py, a column each")
    p.add_argument(
        "--alpha0",
        type=FINITE_NON_NEGATIVE,
        nargs="+",
        help="weights of log pi1 in Q-Adapter adapters' policy pi~, a point each (None: as trained)",
    )
    p.add_argument(
        "--scale",
        type=FINITE_NON_NEGATIVE,
        nargs="+",
        default=[1.0],
        help="the adapters' update scaled, W + scale (alpha/r) B A, a point each "
        "(0: the base weights, 1: as trained, above 1: extrapolated)",
    )
    p.add_argument(
        "--learned",
        help="the frontier's metric of what was learned (None: the first of preference_rate, "
        "implicit_reward_accuracy, win_rate measured)",
    )
    p.add_argument(
        "--kept",
        help="the frontier's metric of what was kept (None: the first of skill_accuracy, reply_nll, "
        "the first --tasks metric measured)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="the frontier as a picture: a curve per adapter through its points (needs matplotlib)",
    )
    p.add_argument(
        "--pairs", nargs="+", help="held-out preference files: preference_ and implicit_reward_ accuracy and margin"
    )
    p.add_argument(
        "--domain", help="with --pairs of DSP: the preferred domain (academy, business, entertainment, literature)"
    )
    p.add_argument(
        "--max_len",
        type=checked(int, "> 1", lambda v: v > 1),
        default=1024,
        help="with --pairs or --reply_nll: longest sequence in tokens (longer: truncated as train.py does)",
    )
    p.add_argument("--micro_batch_size", type=POSITIVE_INT, default=4, help="with --pairs: pairs per forward pass")
    p.add_argument(
        "--reply_nll",
        help="conversations ending with a reply (sample.py's output, or messages "
        "records): each model's mean negative log-likelihood per reply token, truncated to --max_len",
    )
    p.add_argument("--prompts", help="with --reward_model: a JSON Lines file of prompts (as sample.py reads)")
    p.add_argument("--reward_model", help="a reward model (LlamaForSequenceClassification layout) to judge replies")
    p.add_argument(
        "--max_new_tokens", type=POSITIVE_INT, default=256, help="with --prompts: longest greedy reply in tokens"
    )
    add_compile_flag(p, "each decoding step (greedy replies, the built-in checks, lm-eval's generation)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="weights' dtype (None: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--output", help="a JSON file for every number measured")
    lm = p.add_argument_group(
        "lm-evaluation-harness (pip install -r requirements-eval.txt), under lm-eval's own flag names"
    )
    lm.add_argument("--tasks", nargs="+", help="lm-eval task or group names (mmlu gsm8k_cot ...)")
    lm.add_argument("--num_fewshot", type=COUNT, help="examples in each prompt (None: each task's own)")
    lm.add_argument("--limit", type=POSITIVE, help="at most this many documents per task (below 1: a share)")
    lm.add_argument("--apply_chat_template", action="store_true", help="put each prompt in the Llama 3.1 chat format")
    lm.add_argument(
        "--fewshot_as_multiturn",
        type=lambda x: x.lower() in ("true", "1", "yes"),
        nargs="?",
        const=True,
        metavar="BOOL",
        help="few-shot examples as earlier turns (None: with --apply_chat_template)",
    )
    add_nproc_flag(p)
    lm.add_argument("--include_path", help="a directory of task YAMLs of your own")
    lm.add_argument(
        "--batch_size",
        type=POSITIVE_INT,
        default=8,
        help="requests per forward pass (sequences, or prompts decoded together)",
    )
    lm.add_argument("--log_samples", action="store_true", help="keep lm-eval's record of every document in --output")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_or_default(p, argv, ("model", "adapter", "pairs"), toyworld.evaluate_flags(), "evaluate.py")
    if args.adapter is None and args.scale != [1.0]:
        raise UserError("--scale scales an adapter's update; pass --adapter DIR ..., or drop --scale")
    if args.plot is not None:
        if Path(args.plot).suffix.lower() != ".png":
            raise UserError(f"--plot {args.plot} is not a .png file; pass a path such as frontier.png")
        check_output_file("plot", args.plot)
    if args.model is None and args.adapter is None:
        raise UserError("pass --model M for a base model, --adapter DIR ... for adapters (and their base), or both")
    for path in args.pairs or []:
        check_data_file(Path(path))
    if args.reply_nll is not None and not Path(args.reply_nll).is_file():
        raise UserError(
            f"--reply_nll {args.reply_nll} is not a file; pass conversations ending with a reply "
            f"(sample.py's output, or messages records)"
        )
    if args.output is not None:
        check_output_file("output", args.output)  # refused now, not after hours of lm-eval
    if (args.prompts is None) != (args.reward_model is None):
        raise UserError(
            "--prompts FILE and --reward_model RM go together: the prompts to reply to, and the model "
            "that judges the replies"
        )
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include_path {args.include_path} is not a directory; pass the directory of your task YAMLs")
    for flag in ("num_fewshot", "limit", "apply_chat_template", "fewshot_as_multiturn", "include_path", "log_samples"):
        if args.tasks is None and getattr(args, flag) not in (None, False):
            raise UserError(f"--{flag} sets how lm-eval runs --tasks; pass the tasks too, or drop --{flag}")
    if args.fewshot_as_multiturn is None:
        args.fewshot_as_multiturn = args.apply_chat_template
    return args


def task_manager(args):
    """lm-eval's index of tasks, every one of --tasks found in it, before any model is loaded. The task
    YAMLs of --include_path are looked in first: lm-eval's own index of thousands takes seconds to build."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "--tasks runs lm-evaluation-harness, which is not installed: pip install -r requirements-eval.txt"
        ) from None
    if args.include_path is not None:
        manager = TaskManager(include_path=args.include_path, include_defaults=False)
        if all(manager.match_tasks([task]) for task in args.tasks):
            return manager
    manager = TaskManager(include_path=args.include_path)
    missing = [task for task in args.tasks if not manager.match_tasks([task])]
    if missing:  # lm-eval's own message, then how to go on
        raise UserError(
            f"Tasks not found: {', '.join(missing)}; `lm-eval ls tasks` lists them, "
            f"and --include_path adds a directory of your own task YAMLs"
        )
    return manager


def read_policies(args) -> tuple[str, list[Policy]]:
    """(the base model's name, the points to measure: the base model, then each adapter at every --scale
    and, for a Q-Adapter, every --alpha0), read and checked before any model is loaded."""
    adapters = [read_policy(path) for path in args.adapter or []]
    if args.alpha0 is not None and not any(a.mode == "customised" for a in adapters):
        raise UserError(
            "--alpha0 sets the weight of log pi1 in a Q-Adapter's policy, and no --adapter is a "
            "Q-Adapter; drop --alpha0, or pass a Q-Adapter adapter"
        )
    points = [BASE]
    for trained in adapters:
        q_adapter = trained.mode == "customised"
        for scale in args.scale:
            for alpha0 in args.alpha0 if q_adapter and args.alpha0 else [None]:
                point = read_policy(trained.adapter, alpha0, scale)
                # the knobs in the point's name: the scale unless it is 1 alone, alpha0 if several
                knobs = "" if args.scale == [1.0] else f" x{scale:g}"
                knobs += f" a0 {alpha0:g}" if q_adapter and len(args.alpha0 or []) > 1 else ""
                points.append(dataclasses.replace(point, name=point.name + knobs))
    if args.model is not None:
        return args.model, points
    first = adapters[0]
    for other in adapters[1:]:
        if other.fingerprint != first.fingerprint:
            raise UserError(
                f"{other.adapter} was trained on another base model than {first.adapter}; "
                f"evaluate adapters of one base model together, or pass --model"
            )
    return recorded_base_model(first.adapter, first.base_model), points


def read_pairs(args, tokenizer):
    """The held-out pairs, encoded; an empty file is refused."""
    if not args.pairs:
        return []
    encoded = []
    for path in args.pairs:
        pairs = encode_pairs(
            load_pairs(path, args.domain, log=lambda *_: None), tokenizer, args.max_len, log=lambda *_: None
        )
        if not pairs:
            raise UserError(f"{path} holds no usable preference pair; pass a file of pairs in a format train.py reads")
        encoded += pairs
    return encoded


def read_replies(args, tokenizer) -> list[EncodedConversation]:
    """--reply_nll's conversations, encoded (truncated as train.py truncates); an empty file is refused."""
    if args.reply_nll is None:
        return []
    # a file with none is refused there
    conversations = load_conversations(args.reply_nll, log=lambda *_: None)
    encoded = encode_conversations(conversations, tokenizer, args.max_len, log=lambda *_: None)
    if not encoded:
        raise UserError(f"--reply_nll {args.reply_nll}: no conversation fits --max_len {args.max_len}; raise it")
    return encoded


def measure(model, tokenizer, policy: Policy, pairs, world: bool, prompts, replies, manager, model_name, args) -> dict:
    """Every measurement asked for, of one policy."""
    result = {"name": policy.name, "policy": policy.mode, "adapter": policy.adapter}
    result["scale"] = policy.scale if policy.adapter else None
    result["alpha0"] = policy.alpha0 if policy.mode == "customised" else None
    if args.tasks:
        from qadapter_min.harness import run_lm_eval  # imports lm-eval

        result.update(run_lm_eval(model, tokenizer, policy, manager, model_name, args))
    if pairs:
        progress = Progress(f"{policy.name}: preference", len(pairs), "pairs")
        result["preference"] = preference_metrics(
            model, policy, pairs, tokenizer.pad_id, args.micro_batch_size, progress
        )
    if replies:
        result["reply_nll"] = reply_nll(model, policy, replies, args.batch_size)
    if world:
        result["world"] = greedy_report(model, tokenizer, policy, compiled=args.compile)
    if prompts:
        result["replies"] = greedy_replies(model, tokenizer, policy, prompts, args)
    return result


def table(results: list[dict]) -> str:
    """A column per model, a row per metric."""
    rows = []
    for task, metrics in results[0].get("lm_eval", {}).items():
        rows += [
            (f"{task} {metric.split(',')[0]}", [r["lm_eval"][task][metric] for r in results])
            for metric in metrics
            if "_stderr" not in metric
        ]
    if "preference" in results[0]:
        rows += [
            ("preference accuracy (held out)", [r["preference"]["preference_accuracy"] for r in results]),
            ("preference margin (held out)", [r["preference"]["preference_margin"] for r in results]),
            ("implicit reward accuracy (held out)", [r["preference"]["implicit_reward_accuracy"] for r in results]),
            ("implicit reward margin (held out)", [r["preference"]["implicit_reward_margin"] for r in results]),
        ]
    if "world" in results[0]:
        rows += world_rows([r["world"] for r in results])
    if "reply_nll" in results[0]:
        rows += [
            ("NLL per reply token (--reply_nll)", [r["reply_nll"]["nll_per_token"] for r in results]),
            ("  added to the base model's", [r["reply_nll"]["added_to_base"] for r in results]),
        ]
    if "reward" in results[0]:
        rows += [
            ("reward (mean)", [r["reward"]["mean"] for r in results]),
            ("win rate against the base model", [r["reward"]["win_rate_against_base"] for r in results]),
        ]
    return format_table(short_names([r["name"] for r in results]), rows)


def frontier_metrics(args, world: bool) -> tuple[str | None, str | None]:
    """The frontier's two metrics: --learned and --kept, or the defaults for what this command measures
    (None where it measures none), checked before any model is loaded."""
    asked = [
        ("preference", args.pairs or world),
        ("world", world),
        ("reply_nll", args.reply_nll),
        ("reward", args.prompts),
    ]
    measured = {measurement for measurement, yes in asked if yes}
    for flag in ("learned", "kept"):
        if getattr(args, flag) is not None:
            check_metric(flag, getattr(args, flag), measured, args.tasks)
    default_learned, default_kept = default_metrics(measured, args.tasks)
    learned, kept = args.learned or default_learned, args.kept or default_kept
    if args.plot is not None:
        if learned is None or kept is None:
            missing = "--learned" if learned is None else "--kept"
            raise UserError(
                f"--plot draws one metric of what was learned against one of what was kept, and this "
                f"command measures nothing for {missing}; add a measurement (--pairs, --reply_nll, "
                f"--tasks), or drop --plot"
            )
        pyplot()  # refused now where matplotlib is missing, not after the measurements
    return learned, kept


def main(argv=None):
    args = parse_args(argv)
    model_name, policies = read_policies(args)
    measured = (args.tasks, args.pairs, args.prompts, args.reply_nll)
    if not any(measured) and not toyworld.is_world_model(model_name):
        raise UserError(
            "nothing to measure: pass --pairs FILE, --tasks T, --prompts FILE with --reward_model RM, "
            "or --reply_nll FILE"
        )
    learned, kept = frontier_metrics(args, toyworld.is_world_model(model_name))
    manager = task_manager(args) if args.tasks else None
    prompts = load_prompts(args.prompts) if args.prompts else None
    reward_model_dir = check_reward_model(args.reward_model) if args.reward_model else None
    processes = start_processes(args.nproc_per_node)
    model_dir = processes.resolve_model_dir(model_name)
    tokenizer = Tokenizer(model_dir)
    world = toyworld.is_world_model(model_dir)
    if world and args.pairs is None:
        args.pairs = [os.path.relpath(toyworld.WORLD_DIR / "test.jsonl")]
    pairs = read_pairs(args, tokenizer)
    replies = read_replies(args, tokenizer)
    model = load_model(model_dir, dtype=choose_dtype(args.dtype, processes.device), device=processes.device)
    for policy in policies:
        check_base(model, policy, model_name)
    results = []
    for policy in policies:
        with policy_applied(model, policy):
            results.append(measure(model, tokenizer, policy, pairs, world, prompts, replies, manager, model_name, args))
    for result in results if replies else []:  # how far each model moved from the base model's own replies
        nll, base_nll = result["reply_nll"]["nll_per_token"], results[0]["reply_nll"]["nll_per_token"]
        result["reply_nll"]["added_to_base"] = nll - base_nll
    if prompts:
        del model  # the reward model takes its place in memory
        judged = judge(results, prompts, reward_model_dir, processes.device, args)
        for result in results:
            del result["replies"]  # they go to the replies file, beside the numbers
    processes.log(table(results))
    output = {"models": results}
    several = len(args.scale) > 1 or len(args.alpha0 or []) > 1
    if learned and kept and (several or args.plot or args.learned or args.kept):
        output["frontier"] = frontier_of(results, learned, kept)
        processes.log("\n" + frontier_table(output["frontier"]))
        if args.plot is not None and processes.master:
            frontier_plot(output["frontier"], Path(args.plot))
            processes.log(f"frontier: {args.plot}")
    if args.output is not None and processes.master:
        write_json(Path(args.output), output)
        if prompts:
            replies_file = Path(args.output).with_suffix(".replies.jsonl")  # results.json -> results.replies.jsonl
            atomic_write(
                replies_file, lambda p: Path(p).write_text("".join(json.dumps(record) + "\n" for record in judged))
            )
            processes.log(f"replies and rewards of every prompt: {replies_file}")
    leave_processes(processes)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_command_line(main)
