"""The table train.py prints after a run on the built-in world: the base model beside the customised
one, on both axes of the paper. What the model learned: the preference (held-out implicit-reward
accuracy, and the share of greedy replies that take the prefix). What it kept: the skills (the share of
greedy replies that are correct once the prefix is removed)."""

import random
from contextlib import nullcontext
from pathlib import Path

import torch

from qadapter_min.common import is_fsdp_model, write_json
from qadapter_min.data import encode_pairs, load_pairs
from qadapter_min.frontier import format_table
from qadapter_min.generate import generate_batch
from qadapter_min.lora import adapter_disabled
from qadapter_min.objective import Objective
from qadapter_min.policy import BASE, Policy, load_adapter, preference_metrics
from qadapter_min.run_dir import REPORT
from qadapter_min.tokenizer import Tokenizer
from qadapter_min.weights import load_model
from toyworld import WORLD_DIR
from toyworld.world import PREFERENCE_SKILLS, SKILLS, check_reply, make_task


def report_run(model, model_dir, tokenizer: Tokenizer, pad_id: int, args, processes):
    """After a run of train.py on this world's model, both axes: the new preference learned, the old
    skills kept. The table is printed and written to OUT/report.json, by rank 0."""
    if not processes.master or args.objective == "rm":
        return  # rank 0 prints it; the table compares policies, and a reward model is none
    if is_fsdp_model(model):  # rank 0 alone cannot run a sharded model: this one, whole
        model = load_model(model_dir)
        load_adapter(model, args.out)
    report = compare(model, tokenizer, pad_id, args)
    processes.log(format_report(report, args.objective))
    write_json(Path(args.out) / REPORT, report)


def evaluation_prompts(per_skill: int = 30, seed: int = 1234) -> list[tuple[str, str, str]]:
    """(skill, question, answer) triples held out from the preference data."""
    rng = random.Random(seed)
    return [(skill, *make_task(skill, rng)) for skill in SKILLS for _ in range(per_skill)]


@torch.no_grad()
def greedy_report(model, tokenizer: Tokenizer, policy: Policy, per_skill: int = 30, compiled: bool = False) -> dict:
    """preference_rate and skill_accuracy of the policy's greedy replies, overall and per skill
    (compiled: each decoding step through torch.compile)."""
    tasks = evaluation_prompts(per_skill)
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        for _, question, _ in tasks
    ]
    replies = generate_batch(
        model,
        prompts,
        stop_ids=tokenizer.stop_ids,
        max_new_tokens=32,
        policy_mode=policy.mode,
        alpha=policy.alpha,
        alpha0=policy.alpha0,
        compiled=compiled,
    )
    shown, correct, counts = {}, {}, {}
    for (skill, _, answer), reply_ids in zip(tasks, replies):
        preferred, right = check_reply(tokenizer.decode(reply_ids), answer)
        shown[skill] = shown.get(skill, 0) + preferred
        correct[skill] = correct.get(skill, 0) + right
        counts[skill] = counts.get(skill, 0) + 1
    total = sum(counts.values())
    return {
        "preference_rate": sum(shown.values()) / total,
        "skill_accuracy": sum(correct.values()) / total,
        "preference_rate_by_skill": {s: shown[s] / counts[s] for s in SKILLS},
        "skill_accuracy_by_skill": {s: correct[s] / counts[s] for s in SKILLS},
    }


def held_out_pairs(tokenizer: Tokenizer, max_len: int):
    """The world's held-out preference pairs (test.jsonl), encoded."""
    pairs = load_pairs(WORLD_DIR / "test.jsonl", log=lambda *_: None)
    return encode_pairs(pairs, tokenizer, max_len, log=lambda *_: None)


def compare(model, tokenizer: Tokenizer, pad_id: int, args) -> dict:
    """train.py's report: the base model beside the policy just trained (the adapter on the model), on the
    world's held-out pairs and prompts, in the same numbers as evaluate.py gives for the saved adapter."""
    eval_pairs = held_out_pairs(tokenizer, args.max_len)
    objective = Objective.read(vars(args))
    trained = Policy("customised", objective.policy_mode, None, objective.alpha, objective.alpha0, objective)
    model.eval()
    report = {}
    for name, policy in (("base", BASE), ("customised", trained)):
        with adapter_disabled(model) if policy is BASE else nullcontext():
            accuracy = preference_metrics(model, policy, eval_pairs, pad_id, args.micro_batch_size)[
                "preference_accuracy"
            ]
            report[name] = {
                "preference_accuracy": accuracy,
                **greedy_report(model, tokenizer, policy, compiled=args.compile),
            }
    return report


def world_rows(columns: list[dict]) -> list[tuple[str, list[float]]]:
    """The table's rows of greedy-reply checks, one value per column (greedy_report's dicts)."""

    def row(label, key, skill=None):
        return label, [c[key] if skill is None else c[key + "_by_skill"][skill] for c in columns]

    rows = [row("preference rate (greedy replies)", "preference_rate")]
    rows += [
        row(
            f"  {skill} ({'in' if skill in PREFERENCE_SKILLS else 'not in'} the preference data)",
            "preference_rate",
            skill,
        )
        for skill in SKILLS
    ]
    rows.append(row("skill accuracy (retention)", "skill_accuracy"))
    rows += [row(f"  {skill}", "skill_accuracy", skill) for skill in SKILLS]
    return rows


def format_report(report: dict, objective: str) -> str:
    """The table train.py prints: the base model, then the trained policy under its objective's name."""
    columns = [report["base"], report["customised"]]
    accuracy = ("preference accuracy (held out)", [c["preference_accuracy"] for c in columns])
    return format_table(["base", objective], [accuracy, *world_rows(columns)])
